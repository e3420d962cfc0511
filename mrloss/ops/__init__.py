"""The fused, zero-weight-skipping weighted linear cross-entropy: options (`LossOptions`, validated once), output
(`LossOutput`), api (tensor checks, dispatch), the autograd function, the chunk driver, the normalization rules, the
float64 reference and the backends (torch, triton)."""
