"""The vllm backend: our K policy inside a vLLM V1 engine, and that engine served on Ray.

- `settings.py`: the scheduler's settings, read from vLLM's `--additional-config` (no vLLM import).
- `scheduler.py`: `PolicyScheduler`, the `--scheduler-cls` that sets K per request every step (imports vLLM).
- `server.py`: the Serve replica: one vLLM `AsyncLLM` behind our OpenAI router.

Only this package imports vLLM, and only `scheduler.py` / `server.py` do it; `policy/` and `workers/` never.
"""
