"""The vocabulary every layer shares, in modules that import nothing else from the package.

`masks`: per-token mask features, the `allowed` predicate and `MaskSpec`.
`axes`: logical axis names of parameters and activations and the one table mapping them to mesh axes.
model, ops, kernels_pallas, diffusion and training all import these from here, so none of them
has to import another to speak the same language.
"""
