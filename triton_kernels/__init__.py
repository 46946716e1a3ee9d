"""Triton kernels and their launchers, installed as ``fastattn_icl._triton``.

Import this only when a kernel is about to run: importing it imports ``triton``.
"""
