"""One command that trains a draft of any kind for a target: prompts, answers, training, evaluation, card."""
