"""tak: task arithmetic with Kronecker-factored curvature (TAK and DELTA), built on kfac_kernels.

The curvature, linearization, training and merging layers land in later releases; today the
package holds no public API. Layering (one direction): kfac_kernels <- tak.nn <- tak.models <-
tak.curvature <- tak.methods <- tak.train / tak.arithmetic <- tak.cli.
"""
