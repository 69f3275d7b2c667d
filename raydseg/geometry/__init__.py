"""LiDAR geometry: range image, ground removal, 3D segmentation, projection into cameras (pure numpy/numba)."""
