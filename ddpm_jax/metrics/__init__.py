"""Sample-quality metrics: the FID Inception-v3, FID / IS / KID statistics, the offline digits
metric, batched feature extraction and reference statistics."""
