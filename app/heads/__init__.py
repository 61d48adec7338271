"""`train-heads`: Locret retaining heads for a model, learned with the backbone frozen.

- data.py: training documents, real prose with question-answer facts inserted;
- labels.py: per-token targets from the model's own attention to those questions;
- train.py: the regression, its checkpoints and the heads' card;
- official.py: an official Locret checkpoint folded into heads over the hidden state;
- cli.py: the command's options.
"""
