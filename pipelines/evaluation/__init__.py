"""The evaluation stages: evaluate (sample quality), the feature network, register."""
