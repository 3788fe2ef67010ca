"""GLUE: readers for the original TSV files of the nine tasks, metrics, finetuning."""
