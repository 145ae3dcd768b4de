"""Offline TFDS dataset builders."""
