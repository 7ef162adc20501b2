"""salt.kernels"""
