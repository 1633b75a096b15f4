"""Seeing a model's linear layers at work: their inputs in the forward, their output gradients in a
backward that computes nothing else.

Inside ``Capture(layers, on_input, on_grad)``, the i-th call of a layer in a forward calls
``on_input(layer, a, i)`` with its input a (..., d_in), and passes its output z through a tap: an
identity whose backward calls ``on_grad(layer, dz, call=i)``.
A convolution's a and z are its unfolded patches (N, L, C·kh·kw) and outputs (N, L, d_out) over the L output
positions; an embedding's a is its token ids (..., 1), the index of each one-hot input (an nn.Embedding subclass with
a forward of its own is tapped where that reads its weight); a resized position table's a is each token's row of the
map from the table (``layers.resized_rows``); open_clip's output projection is seen through its tower's ``_pool``
(a = the pooled features) and its tower's output (z). Dense groups (``tak.curvature.dense``: the norms, LayerScales,
q/v biases and class token) get taps too, whose gradients become per-example gradient vectors for
``on_dense(group, v)``, summed over the group's calls in one forward (its exact block, when a LayerNorm is applied
more than once); a call on a tensor the batch shares (``tokens``) adds one row of its own. Every tap also feeds a
shared scalar, the sink (one per device, made there), so ``capture.backward(f, s)`` — a VJP of the
feature output f with cotangent s, taken with respect to the sinks alone — runs exactly the backward that reaches the
taps: no weight-gradient GEMMs, no gradients kept. ``capture.batched_grads(f, S)`` instead returns the output
gradients of every layer for a batch of cotangents S (m, *f.shape) in one vmapped backward."""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import dense as dense_groups
from .layers import Layer, is_attention_pool, is_conv1d, relative_table, resized_rows
from .tokens import TABLE


@contextlib.contextmanager
def fitting_mode(model: nn.Module):
    """``model`` in eval mode, with the modules that have an ``inplace`` flag (``nn.ReLU(inplace=True)``,
    ``nn.Dropout(inplace=True)``, ...) made out of place: a tapped output is a view that must not be
    modified in place; and timm's attentions with q and v biases (EVA, BEiT) made to call their ``qkv`` module and add
    the biases after (``qkv_bias_separate``), not to pass its weight to ``F.linear``: the same map, seen. Every
    module's ``training``, ``inplace`` and ``qkv_bias_separate`` flags are restored on exit."""
    modules = list(model.modules())
    training = [m.training for m in modules]
    inplace = [m for m in modules if getattr(m, "inplace", None) is True]
    fused = [m for m in modules if getattr(m, "qkv_bias_separate", None) is False]
    model.eval()
    for m in inplace:
        m.inplace = False
    for m in fused:
        m.qkv_bias_separate = True
    try:
        yield model
    finally:
        for m, flag in zip(modules, training):
            m.training = flag
        for m in inplace:
            m.inplace = True
        for m in fused:
            m.qkv_bias_separate = False


class _Tap(torch.autograd.Function):
    """z as it is (a view, or a ``copy``), whose backward shows dz to ``callback``."""

    @staticmethod
    def forward(ctx, z, sink, callback, copy: bool):
        ctx.callback = callback
        return z.clone() if copy else z.view_as(z)

    @staticmethod
    def backward(ctx, dz):
        if ctx.callback is not None:
            ctx.callback(dz)
        return dz, None, None, None


class _EmbeddingReads(TorchFunctionMode):
    """Inside the forward of an nn.Embedding subclass with a forward of its own (BART's and OPT's positions, which
    compute their ids; Gemma's word embeddings, scaled after the lookup): each read of its weight, ``F.embedding(ids,
    weight)`` or ``weight[ids]``, a call of its layer with those ids, tapped before whatever the forward does next."""

    def __init__(self, capture: "Capture", layer: Layer):
        super().__init__()
        self.capture, self.layer = capture, layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        weight = self.layer.module.weight
        if func is F.embedding and (args[1] if len(args) > 1 else kwargs.get("weight")) is weight:
            ids = args[0] if args else kwargs["input"]
        elif func is torch.Tensor.__getitem__ and args[0] is weight and isinstance(args[1], torch.Tensor) and \
                args[1].dtype in (torch.int32, torch.int64):
            ids = args[1]
        else:
            return out
        return self.capture.tap(self.layer, ids.unsqueeze(-1), out)


class Capture:
    def __init__(self, layers: dict[str, Layer], on_input, on_grad=None, dense=None, on_dense=None):
        self.layers, self.on_input, self.on_grad = layers, on_input, on_grad
        self.dense, self.on_dense = dense or {}, on_dense
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.to_vectors: dict[str, list] = {}  # dense group -> per call, (dz -> per-example vectors, shared)
        self._dense_sums: dict[tuple, torch.Tensor] = {}  # (dense group, shared) -> its vectors summed over calls
        self._handles, self._patched = [], []
        self._batched = False
        self.copies = False  # taps give copies (see ``check_in_place``), not views
        self._silent = False  # taps report nothing (``check_in_place``'s forward)
        self.batch = None  # the current batch's BatchTokens

    def __enter__(self):
        try:
            return self._install()
        except BaseException:
            self.__exit__()
            raise

    def _install(self):
        self._sinks = {}  # device -> the leaf the taps there hang on (made once: no host copy per tap)
        attentions = {}  # id -> (nn.MultiheadAttention, its in_proj Layer or None when only out_proj is factored)
        pools = {}  # id -> (AttentionPool2d, its positions' Layer or None)
        for layer in self.layers.values():
            if isinstance(layer.module, nn.MultiheadAttention):
                attentions[id(layer.module)] = (layer.module, layer)
            elif is_attention_pool(layer.module):  # its positions, tapped by its replaced forward
                pools[id(layer.module)] = (layer.module, layer)
            elif layer.layout == "conv":
                self._handles.append(layer.module.register_forward_hook(self._conv_hook(layer)))
            elif layer.layout == "transposed" and not is_conv1d(layer.module):  # open_clip's output projection
                self._handles.append(layer.module.register_forward_hook(self._projection_hook(layer)))
            elif layer.layout == "embedding" and relative_table(layer.module) is not None:  # DeBERTa's
                self._patch(layer.module, "get_rel_embedding", self._table_reader(layer))
            elif layer.layout == "embedding" and type(layer.module).forward is nn.Embedding.forward:
                self._handles.append(layer.module.register_forward_hook(
                    lambda module, inputs, output, layer=layer: self.tap(layer, inputs[0].unsqueeze(-1), output)))
            elif layer.layout == "embedding" and isinstance(layer.module, nn.Embedding):  # with a forward of its own
                self._handles += self._read_hooks(layer)
            elif layer.layout == "embedding" and hasattr(layer.module, "ln_pre"):  # open_clip's position table
                self._handles.append(layer.module.ln_pre.register_forward_pre_hook(self._positions_hook(layer)))
            elif layer.layout == "embedding":  # timm's
                self._handles.append(layer.module.pos_drop.register_forward_hook(self._positions_hook(layer)))
            elif layer.layout == "resized":  # Hugging Face ViT's, DINOv2's, CLIP's and SigLIP's
                self._handles.append(layer.module.register_forward_hook(self._resized_positions_hook(layer),
                                                                        with_kwargs=True))
            else:
                self._handles.append(layer.module.register_forward_hook(self._linear_hook(layer)))
                if isinstance(layer.attention, nn.MultiheadAttention):  # an out_proj: called by the replaced forward
                    attentions.setdefault(id(layer.attention), (layer.attention, None))
                elif layer.attention is not None:  # a projection of an AttentionPool2d: likewise
                    pools.setdefault(id(layer.attention), (layer.attention, None))
        for mha, in_proj in attentions.values():
            self._patch(mha, "forward", _attention_forward(mha, in_proj, self))
        for pool, positions in pools.values():
            self._patch(pool, "forward", _attention_pool_forward(pool, positions, self))
        for group in self.dense.values():
            self._handles.append(dense_groups.install(group, self._dense_tap, lambda: self.batch, self.calls))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        for module, name, before in reversed(self._patched):  # back to what the instance had
            if before is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = before
        self._handles, self._patched, self.outputs, self.to_vectors = [], [], {}, {}

    @contextlib.contextmanager
    def paused(self):
        """The model without the capture's hooks and patches inside the block."""
        self.__exit__()
        try:
            yield
        finally:
            self._install()

    def _linear_hook(self, layer):
        def hook(module, inputs, output):
            return self.tap(layer, inputs[0], output)
        return hook

    def _patch(self, module: nn.Module, name: str, method) -> None:
        """Set an instance attribute, remembering the one it shadows (restored on exit)."""
        self._patched.append((module, name, module.__dict__.get(name)))
        setattr(module, name, method)

    def _conv_hook(self, layer):
        def hook(conv, inputs, output):
            x = inputs[0] if inputs[0].dim() == 4 else inputs[0].unsqueeze(0)
            padding = 0 if conv.padding == "valid" else conv.padding
            a = F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride).transpose(1, 2)
            z = output if output.dim() == 4 else output.unsqueeze(0)
            z = self.tap(layer, a, z.flatten(2).transpose(1, 2))  # (N, L, d_out)
            return z.transpose(1, 2).reshape(output.shape)
        return hook

    def _positions_hook(self, layer):
        """The tokens x (N, T', d) that ln_pre takes (open_clip) or pos_drop gives (timm) hold the position table's
        T rows at the ids 0..T-1 of every image: all of x, or timm's tokens after the class and register ones where
        the table leaves them out (``no_embed_class``)."""
        tower = layer.module
        start = tower.num_prefix_tokens if getattr(tower, "no_embed_class", False) else 0

        def tapped(x):
            ids = torch.arange(layer.d_in, device=x.device).expand(x.shape[0], -1).unsqueeze(-1)
            z = self.tap(layer, ids, x[:, start:start + layer.d_in])
            return z if z.shape[1] == x.shape[1] else torch.cat([x[:, :start], z, x[:, start + layer.d_in:]], 1)
        if hasattr(tower, "ln_pre"):
            return lambda module, args: (tapped(args[0]),) + tuple(args[1:])
        return lambda module, args, output: tapped(output)

    def _read_hooks(self, layer):
        """Hooks that tap the reads of an nn.Embedding subclass's weight in its forward (``_EmbeddingReads``)."""
        reads = _EmbeddingReads(self, layer)

        def enter(module, args):
            reads.__enter__()

        def leave(module, args, output):
            reads.__exit__(None, None, None)
        module = layer.module
        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]

    def _resized_positions_hook(self, layer):
        """Hugging Face ViT's, DINOv2's and CLIP's embeddings give [class; registers; patches] (N, 1 + R + P, d) (R = 0
        but in DINOv2 with registers), SigLIP's the patches alone: the class and patch tokens hold R @ table
        (``layers.resized_rows``), so their inputs are R's rows, made once per image size (R depends on the size,
        not on the table's values)."""
        maps = {}  # (image size, interpolate_pos_encoding) -> R

        def hook(embeddings, args, kwargs, output):
            pixels = args[0] if args else kwargs["pixel_values"]
            key = tuple(pixels.shape[-2:]), kwargs.get("interpolate_pos_encoding")
            if key not in maps:
                maps[key] = resized_rows(embeddings, *key)
            rows = maps[key]
            registers = output.shape[1] - rows.shape[0]
            tokens = output if registers == 0 else torch.cat([output[:, :1], output[:, 1 + registers:]], 1)
            z = self.tap(layer, rows.expand(output.shape[0], -1, -1), tokens)
            return z if registers == 0 else torch.cat([z[:, :1], output[:, 1:1 + registers], z[:, 1:]], 1)
        return hook

    def _table_reader(self, layer):
        """DeBERTa's encoder reads its relative position table whole in ``get_rel_embedding`` (then LayerNorms it, in
        v2): the method runs as it is on the weight behind a tap, its input the ids of the table's K rows, one input
        the batch shares (``tokens.TABLE``)."""
        encoder = layer.module
        table, read = relative_table(encoder), encoder.get_rel_embedding

        def get_rel_embedding():
            weight = table.weight
            if self.batch is not None:
                self.batch.layouts[layer.name, self.calls(layer.name)] = TABLE
            ids = torch.arange(weight.shape[0], device=weight.device)[None, :, None]
            table.__dict__["weight"] = self.tap(layer, ids, weight[None])[0]  # found before the parameter
            try:
                return read()
            finally:
                del table.__dict__["weight"]
        return get_rel_embedding

    def _projection_hook(self, layer):
        """Hooks for z = pooled @ proj: ``_pool`` keeps the pooled features, the tower's output is tapped."""
        tower, pool, pooled = layer.module, layer.module._pool, []

        def keep_pooled(x):
            out = pool(x)
            pooled.append(out[0])
            return out
        self._patch(tower, "_pool", keep_pooled)

        def hook(module, inputs, output):
            z = self.tap(layer, pooled.pop(), output[0] if isinstance(output, tuple) else output)
            return (z, *output[1:]) if isinstance(output, tuple) else z
        return hook

    def tap(self, layer: Layer, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Report the input a of ``layer``'s next call; return its output z behind a tap."""
        call = self.calls(layer.name)
        if not self._silent:
            self.on_input(layer, a, call)
        callback = None if self.on_grad is None or self._silent else (
            lambda dz: None if self._batched else self.on_grad(layer, dz, call=call))
        z = _Tap.apply(z, self._sink(z.device), callback, self.copies)
        self.outputs.setdefault(layer.name, []).append(z)
        return z

    def calls(self, name: str) -> int:
        """How many calls of layer or group ``name`` the current forward has tapped: the index of its next."""
        return len(self.outputs.get(name, ()))

    def _dense_tap(self, group, z, to_vectors, shared: bool = False):
        callback = None if self.on_dense is None or self._silent else (
            lambda dz: None if self._batched else self._add_dense(group.name, to_vectors(dz), shared))
        z = _Tap.apply(z, self._sink(z.device), callback, self.copies)
        self.outputs.setdefault(group.name, []).append(z)
        self.to_vectors.setdefault(group.name, []).append((to_vectors, shared))
        return z

    def _sink(self, device: torch.device) -> torch.Tensor:
        if device not in self._sinks:
            self._sinks[device] = torch.zeros((), requires_grad=True, device=device)
        return self._sinks[device]

    def _add_dense(self, name: str, v: torch.Tensor, shared: bool) -> None:
        """Add one call's per-example vectors (one vector, for a ``shared`` call: the batch's sum) to the group's
        sum of such calls (the gradient of a parameter used by several calls is the sum of theirs)."""
        key = name, shared
        self._dense_sums[key] = v if key not in self._dense_sums else self._dense_sums[key] + v

    def _flush_dense(self) -> None:
        """``on_dense`` once per group with its summed vectors, the shared calls' as rows of their own (after a
        backward)."""
        rows = {}
        for (name, _), v in sorted(self._dense_sums.items(), key=lambda item: item[0][1]):
            rows.setdefault(name, []).append(v)
        for name, vs in rows.items():
            self.on_dense(self.dense[name], torch.cat(vs))
        self._dense_sums = {}

    def clear(self, batch=None):
        """Forget the outputs of the last forward (call before the next batch, with its ``BatchTokens``)."""
        self.outputs, self.to_vectors, self._dense_sums = {}, {}, {}
        self.batch = batch

    def check_in_place(self, model: nn.Module, example, output_fn, tokens) -> None:
        """Taps give copies (``copies``) where the model writes into a tapped output in place (DeBERTa v1 divides
        its position queries with ``/=``), which autograd forbids on a view a custom Function gives; elsewhere they
        give views, which cost nothing. Found on a forward of one ``example`` (a batch of one, whose ``BatchTokens``
        are ``tokens``) with the taps silent; an error of another kind comes again with the whole batch."""
        self._silent = True
        self.clear(tokens)
        try:
            output_fn(model, example)
        except Exception as e:  # noqa: BLE001 - only an in-place write into a tap decides; the batch shows the rest
            self.copies = isinstance(e, RuntimeError) and "is being modified inplace" in str(e)
        finally:
            self._silent = False
            self.clear()

    def model_fed_modules(self) -> dict[str, nn.Module]:
        """{name: module} of the linear layers and norms whose inputs come as the model passes them (the
        others' are rearranged here: batch-first), for ``tokens.measure_layouts``."""
        linear = {n: l.module for n, l in self.layers.items() if isinstance(l.module, nn.Embedding) or
                  is_conv1d(l.module) or isinstance(l.module, nn.Linear) and l.layout == "linear" and l.attention is None}
        norms = ("layernorm", "rmsnorm", "batchnorm", "layerscale")
        return linear | {n: g.module for n, g in self.dense.items() if g.kind in norms}

    def backward(self, f: torch.Tensor, s: torch.Tensor, retain_graph: bool = False) -> None:
        """Backward of ⟨f, s⟩ through the taps only: each layer's ``on_grad`` sees its dz, each dense
        group's ``on_dense`` its summed vectors."""
        if self._sinks:  # none when the output reached no tap
            torch.autograd.grad(f, list(self._sinks.values()), s, retain_graph=retain_graph, allow_unused=True)
        self._flush_dense()

    def probe(self, f: torch.Tensor, S: torch.Tensor, chunk: int) -> None:
        """Feed the gradient callbacks with the output gradients for the cotangents S (m, *f.shape):
        one backward through the taps when m = 1, else batched backwards of ``chunk`` cotangents each
        (``on_grad(layer, dz, samples=k, call=i)`` with dz (k, *z.shape); ``on_dense(group, v)`` with v
        (k·N, size))."""
        if len(S) == 1:
            self.backward(f, S[0])
            return
        for i in range(0, len(S), chunk):
            part = S[i:i + chunk]
            for name, calls in self.batched_grads(f, part, retain_graph=i + chunk < len(S)).items():
                for call, g in calls:
                    if name in self.layers:
                        self.on_grad(self.layers[name], g, samples=len(part), call=call)
                    else:
                        to_vectors, shared = self.to_vectors[name][call]
                        self._add_dense(name, torch.cat([to_vectors(gm) for gm in g.unbind(0)]), shared)
            self._flush_dense()

    def batched_grads(self, f: torch.Tensor, S: torch.Tensor,
                      retain_graph: bool = False) -> dict[str, list[tuple[int, torch.Tensor]]]:
        """{layer: [(call, dz (m, *z.shape)) per call of the layer that the output depends on]} for the m
        cotangents S (m, *f.shape)."""
        names = [(n, i) for n, zs in self.outputs.items() for i in range(len(zs))]
        if not names:
            return {}
        self._batched = True
        try:
            grads = torch.autograd.grad(f, [self.outputs[n][i] for n, i in names], S, retain_graph=retain_graph,
                                        is_grads_batched=True, allow_unused=True)
        finally:
            self._batched = False
        out: dict[str, list[torch.Tensor]] = {}
        for (n, i), g in zip(names, grads):
            if g is not None:
                out.setdefault(n, []).append((i, g))
        return out


def _additive_mask(mask, dtype):
    """A bool mask (True = do not attend, nn.MultiheadAttention's convention) or float mask, as an additive float mask."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _attention_forward(mha: nn.MultiheadAttention, layer: Layer | None, capture: Capture):
    """``mha.forward`` with the fused input projection as a visible linear map (tapped when ``layer``, its in_proj
    Layer, is given) and ``out_proj`` called as a module (so its hooks run). Self-attention projects its one input
    once: [Q | K | V] = x W_inᵀ + b_in. Attention over other tensors (a pooling probe as the query, cross-attention)
    projects each distinct one of (query, key, value) in turn, a call of the layer each, and takes Q from the query's
    projection, K from the key's, V from the value's: the rows it does not take get no gradient. Same outputs as
    the original."""

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        projected = {}  # id(input) -> its projection (N, T, 3d), each distinct input projected once
        for x in (query, key, value):
            if id(x) not in projected:
                a = x.unsqueeze(0) if unbatched else x if mha.batch_first else x.transpose(0, 1)
                z = F.linear(a, mha.in_proj_weight, mha.in_proj_bias)
                projected[id(x)] = z if layer is None else capture.tap(layer, a, z)
        d, h = mha.embed_dim, mha.num_heads
        q, k, v = (projected[id(x)][..., i * d:(i + 1) * d] for i, x in enumerate((query, key, value)))
        (n, t, _), s = q.shape, k.shape[1]
        q, k, v = (u.reshape(n, -1, h, d // h).transpose(1, 2) for u in (q, k, v))
        mask = _additive_mask(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.reshape(1, 1, t, s) if mask.dim() == 2 else mask.reshape(n, h, t, s)
        kpm = _additive_mask(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.reshape(n, 1, 1, s)
            mask = kpm if mask is None else mask + kpm
        if is_causal and mask is None:
            mask = torch.full((t, s), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        dropout = mha.dropout if mha.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / (d // h) ** 0.5
            p = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            o = F.dropout(p, dropout, mha.training) @ v
            weights = p.mean(1) if average_attn_weights else p
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
            weights = None
        o = mha.out_proj(o.transpose(1, 2).reshape(n, t, d))
        if unbatched:
            return o.squeeze(0), None if weights is None else weights.squeeze(0)
        return (o if mha.batch_first else o.transpose(0, 1)), weights

    return forward


def _attention_pool_forward(pool: nn.Module, positions: Layer | None, capture: Capture):
    """open_clip's ``AttentionPool2d.forward`` with its projections called as modules (so their hooks run) and its
    positions tapped when ``positions``, their Layer, is given: x (N, C, H, W) -> tokens [mean; x] +
    positional_embedding (N, 1 + HW, C); the mean token's query attends over them all (the one output the pool
    takes: the other queries' rows do not reach it), then c_proj. Same output as the original."""

    def forward(x):
        n, h = x.shape[0], pool.num_heads
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([x.mean(1, keepdim=True), x], 1) + pool.positional_embedding.to(x.dtype)
        if positions is not None:
            x = capture.tap(positions, torch.arange(x.shape[1], device=x.device).expand(n, -1).unsqueeze(-1), x)
        q, k, v = pool.q_proj(x[:, :1]), pool.k_proj(x), pool.v_proj(x)
        q, k, v = (u.reshape(n, u.shape[1], h, -1).transpose(1, 2) for u in (q, k, v))
        return pool.c_proj(F.scaled_dot_product_attention(q, k, v).reshape(n, -1))

    return forward
