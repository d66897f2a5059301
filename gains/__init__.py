"""GAInS: Gradient Anomaly-aware biomedical Instance Segmentation, in pure PyTorch."""
