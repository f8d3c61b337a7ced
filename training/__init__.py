"""The demo model pair: trained here on the Python stdlib, shipped in `models/`, measured on `bench/prompts/`.

Commands: `python -m training.train` (tokenizer, target, draft), `python -m training.prompts`
(held-out prompt sets), `python -m training.acceptance` (greedy acceptance and expert usage).
"""
