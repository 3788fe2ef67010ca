"""Finetuning and evaluation on downstream tasks: GLUE and RACE (``python tasks/main.py``)."""
