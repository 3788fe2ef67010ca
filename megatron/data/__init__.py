"""The data pipeline: indexed datasets, preprocessing, the BERT pretraining dataset, samplers."""
