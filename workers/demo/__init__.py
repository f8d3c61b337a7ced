"""The demo model pair: trained here on the Python stdlib, shipped in `models/`, measured on `bench/prompts/`.

Commands: `python -m workers.demo.train` (tokenizer, target, draft), `python -m workers.demo.prompts`
(held-out prompt sets), `python -m workers.demo.acceptance` (greedy acceptance and expert usage).
"""
