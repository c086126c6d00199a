"""On-device MNN models for CoDA: the DIN CTR model, the sample classifier, their features,
the versioned model store (M / M0 / Mbuf) and the host-API model ops."""
