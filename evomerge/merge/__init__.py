"""Merging: pure tensor methods, recipes, and the engines that apply them."""
