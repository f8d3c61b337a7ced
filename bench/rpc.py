"""Per-call cost of a Ray Serve handle call against a direct Ray actor call, side by side in one run.

    python -m bench.rpc

Why it exists: the engine calls the drafter and the target every iteration; this measurement is why the
hot path uses direct actor handles (cluster/deployments.py).
"""

import threading
import time

import ray
from ray import serve

ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)


@serve.deployment
class S:
    def f(self, x):
        return x

    def actor(self):
        return A.remote()


@ray.remote
class A:
    def f(self, x):
        return x


serve.run(S.bind(), name="s", route_prefix=None)
h = serve.get_deployment_handle("S", app_name="s")
a = A.remote()
ray.get(a.f.remote(1))
res = {}


def bench():
    for name, call in [
        ("serve", lambda: h.f.remote([1] * 100).result()),
        ("actor", lambda: ray.get(a.f.remote([1] * 100))),
    ]:
        for _ in range(20):
            call()
        t = time.perf_counter()
        for _ in range(200):
            call()
        res[name] = (time.perf_counter() - t) / 200 * 1e3


th = threading.Thread(target=bench)
th.start()
th.join()
print({k: f"{v:.2f} ms" for k, v in res.items()})
