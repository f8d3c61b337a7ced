"""The vllm backend: our K policy inside a vLLM V1 engine, and that engine served on Ray.

- `settings.py`: the scheduler's settings, read from vLLM's `--additional-config` (no vLLM import).
- `scheduler.py`: `PolicyScheduler`, the `--scheduler-cls` that sets K per request every step (imports vLLM).
- `runner.py`: `CatchUpWorker`, the `--worker-cls` whose model runner runs no drafter forward on steps where
  every K is 0 and catches the drafter's KV cache up when a request drafts again (imports vLLM).
- `executor.py`: executors (`--distributed-executor-backend`) whose engine core does not fetch drafts from
  the worker after a step that drafted nothing (imports vLLM).
- `server.py`: the Serve replica: one vLLM `AsyncLLM` behind our OpenAI router.

Only this package imports vLLM, and only `scheduler.py` / `runner.py` / `executor.py` / `server.py` do it; `policy/` and `workers/` never.
"""
