"""The README's examples stay true: its kfac_kernels block runs as written on small random inputs, and every
`tak` command it shows parses (sub-command, flags, values and the TrainConfig they make)."""
import re
import shlex
from pathlib import Path

import torch

import kfac_kernels as kk
from tak import cli

README = Path(__file__).parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    """The README's ``language`` code blocks, each prefixed with blank lines so that line numbers are the file's."""
    text = README.read_text()
    return ["\n" * text.count("\n", 0, m.start(1)) + m.group(1)
            for m in re.finditer(rf"```{language}\n(.*?)```", text, re.S)]


def _spd(n: int, generator) -> torch.Tensor:
    m = torch.randn(n, n + 2, generator=generator)
    return m @ m.T / n


def test_the_kfac_kernels_block_runs_as_written():
    g = torch.Generator().manual_seed(0)
    d, n = 5, 9  # one width for every layer: the block reuses x, b for the linear and the norm

    def r(*shape):
        return torch.randn(*shape, generator=g)

    U_B, U_A = torch.linalg.qr(r(d, d))[0], torch.linalg.qr(r(d, d))[0]
    inputs = dict(tau=r(d, d), B=_spd(d, g), A=_spd(d, g), taus=[r(d, d), r(3, 7)], Bs=[_spd(d, g), _spd(3, g)],
                  As=[_spd(d, g), _spd(7, g)], U_B=U_B, U_A=U_A, S=r(d, d).abs(), C=_spd(d, g), X=r(n, d),
                  g=r(n, d), a=r(n, d), x=r(n, d), dx=r(n, d), W=r(d, d), dW=r(d, d), b=r(d), db=r(d),
                  q=r(2, 3, 7, d), k=r(2, 3, 6, d), v=r(2, 3, 6, d), dq=r(2, 3, 7, d), dk=r(2, 3, 6, d),
                  dv=r(2, 3, 6, d), w=r(d), dw=r(d), F=_spd(11, g))
    before = {name: t.clone() for name, t in inputs.items() if name in ("tau", "S", "C", "X")}
    namespace = dict(inputs)
    (block,) = [b for b in _blocks("python") if "import kfac_kernels as kk" in b]
    exec(compile(block, str(README), "exec"), namespace)

    projected = (U_B.T.double() @ before["tau"].double() @ U_A.double()).square()
    torch.testing.assert_close(namespace["penalty"].double(), (before["S"].double() * projected).sum(),
                               rtol=1e-5, atol=1e-5)
    X = before["X"].double()
    torch.testing.assert_close(namespace["C"].double(), before["C"].double() + X.T @ X, rtol=1e-5, atol=1e-5)
    assert namespace["o"].shape == namespace["do"].shape == (2, 3, 7, d)
    assert isinstance(kk.BlockDiagonalFactor.from_dense(inputs["F"], k=4), kk.BlockDiagonalFactor)


def _tak_commands() -> list[list[str]]:
    """The `tak ...` commands of the README's shell blocks, as argv lists (loop variables set to 0)."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$|^#.*$", "", line).replace("${k}", "0")
            for part in re.split(r"&&|;|\bdo\b", line):
                words = shlex.split(part)
                if words[:1] == ["tak"]:
                    commands.append(words[1:])
    return commands


def test_every_tak_command_of_the_readme_parses(monkeypatch):
    def check(args):
        if args.command in ("train", "fit"):
            cli._config(args, skip=("kind", "out") if args.command == "fit" else ())
        seen.append(args.command)
        return 0

    seen = []
    monkeypatch.setattr(cli, "_COMMANDS", {name: check for name in cli._COMMANDS})
    commands = _tak_commands()
    for argv in commands:
        assert cli.main(argv) == 0, argv
    assert set(seen) == set(cli._COMMANDS), f"the README shows no `tak {set(cli._COMMANDS) - set(seen)}`"
