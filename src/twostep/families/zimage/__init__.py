"""families/zimage"""
