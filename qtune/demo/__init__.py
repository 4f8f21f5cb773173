"""Synthetic demo corpus for qtune."""
