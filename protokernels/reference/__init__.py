"""Plain-PyTorch implementations of every op: any device, float64 included, bounded scratch memory."""
