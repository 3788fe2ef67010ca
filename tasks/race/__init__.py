"""RACE: reader for the original directory layout, multiple-choice finetuning."""
