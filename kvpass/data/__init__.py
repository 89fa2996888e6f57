"""Text made locally from seeds, with nothing to download: passkey prompts, the long-context tasks
the evaluation scores, and the training corpus of the gates (kept apart from the tasks)."""
