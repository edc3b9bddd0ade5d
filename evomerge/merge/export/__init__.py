"""Exports: recipes to Hugging Face model directories and mergekit YAML."""
