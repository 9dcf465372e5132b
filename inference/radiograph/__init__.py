"""Radiograph models: vertebrae with levels, heights and fracture grades (analysis "spine-xr").

torch is imported lazily, inside the functions that need it.
"""
