"""A multi-node Ray cluster on one machine, running the service as a cluster of cloud machines would:
what the cluster tests (tests/deployments/serve/test_cluster.py) and the cluster drill
(loadtests/drill.py --cluster) start, and what anyone can start by hand:

    scripts/local-cluster.sh                   # head + 1 API node + 2 generator nodes, the tiny model
    scripts/local-cluster.sh --generator-nodes 0   # no generator node at first (/readyz says why)

Nodes are Ray nodes of their own (`ray.cluster_utils.Cluster`, as Ray's own multi-node tests run):
- the head and `api_nodes - 1` more API nodes declare `musicgen_api` (the ingress and the validator
  ask for it, `api_resources`), at most one ingress replica each (`max_ingress_per_node`);
- generator nodes stand in for GPU nodes: they declare `musicgen_generator`, which generators ask for
  (`generator_resources`), as the GPU groups of cluster/kuberay and cluster/launcher declare it.
Each node has its own environment and its own MUSICGEN_DATA_DIR (nothing may rely on a shared local
disk) and its own HTTP proxy port (Serve's proxy on every node, `proxy_location: EveryNode`; other
nodes than the head set RAY_SERVE_WORKER_PROXY_HTTP_PORT). Redis is a separate server reached by URL,
append-only, and is also the head's GCS storage (fault tolerance, as KubeRay configures it): the head's
GCS can be killed and restarted. Results and uploads are in an S3-compatible bucket (moto's server),
or, with `storage="local"`, on each node's own disk (the misconfiguration /readyz must catch).

The app is deployed from serve_config.yaml as containers and KubeRay take it (`serve_config(host=
"0.0.0.0")`: API keys required), with only the cluster's own settings added (model, Redis, storage,
resources, replica counts). A killed node is killed hard: SIGKILL to every process of that node at once
(each process carries MUSICGEN_LOCAL_NODE in its environment), as a machine that loses power.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.service.redis_server import EmbeddedRedis, free_port

GENERATOR_RESOURCE = "musicgen_generator"
API_RESOURCE = "musicgen_api"
NODE_MARK = "MUSICGEN_LOCAL_NODE"  # every process of a node has it in its environment: its name
BUCKET = "musicgen"
PASSED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "MUSICGEN_CACHE_DIR", "MUSICGEN_ASSETS_DIR", "PATH")


@dataclass
class Node:
    name: str
    role: str  # "head", "api" or "generator"
    port: int  # its Serve HTTP proxy's
    data_dir: Path
    ray_node: object = field(repr=False, default=None)  # ray._private.node.Node

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class LocalCluster:
    """`start()` brings up Redis, the bucket and the nodes, deploys the app and waits for /readyz
    (unless no generator node runs); `stop()` takes everything down. Used as a context manager."""

    def __init__(
        self,
        root: str | Path,
        *,
        api_nodes: int = 2,  # the head included
        generator_nodes: int = 2,
        model: str = "tiny",
        storage: str = "s3",  # or "local": each node's own disk
        app_args: dict | None = None,  # more args of the app, over serve_config.yaml's
        api_key: str | None = None,  # an admin key (MUSICGEN_API_KEYS); default: a new one
        lease_s: float = 5.0,  # how soon a killed generator's job is taken back
        log=print,
    ):
        from deployments.service.store.apikeys import new_secret

        if api_nodes < 1:
            raise ValueError("the head is an API node: api_nodes >= 1")
        if storage not in ("s3", "local"):
            raise ValueError("storage is 's3' or 'local'")
        self.root = Path(root).resolve()
        self.api_nodes, self.generator_nodes, self.model, self.storage = (
            api_nodes,
            generator_nodes,
            model,
            storage,
        )
        self.app_args, self.lease_s, self.log = dict(app_args or {}), lease_s, log
        self.api_key = api_key or new_secret()
        self.nodes: dict[str, Node] = {}
        self.redis: EmbeddedRedis | None = None
        self.s3: Any = None  # moto.server.ThreadedMotoServer
        self.s3_endpoint: str | None = None
        self.cluster: Any = None  # ray.cluster_utils.Cluster
        self._generators_added = 0

    # -- the pieces --------------------------------------------------------------------------------
    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    @property
    def head(self) -> Node:
        return self.nodes["head"]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def _common_env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "disabled")
        if self.s3_endpoint:
            env.update(
                MUSICGEN_S3_ENDPOINT_URL=self.s3_endpoint, AWS_ACCESS_KEY_ID="test",
                AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
            )  # fmt: skip
        return env

    def _start_s3(self) -> None:
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per S3 request
        port = free_port()
        self.s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.s3.start()
        self.s3_endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket=BUCKET)  # fmt: skip

    def _node_args(self, name: str, role: str, port: int) -> dict:
        data = self.root / "nodes" / name
        data.mkdir(parents=True, exist_ok=True)
        env = {**self._common_env(), "MUSICGEN_DATA_DIR": str(data), NODE_MARK: name}
        if role != "head":
            env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(port)
        resources = {GENERATOR_RESOURCE: 1} if role == "generator" else {API_RESOURCE: 4}
        self.nodes[name] = Node(name, role, port, data)
        # a generator takes its node's one CPU; the API's replicas take a quarter each
        return {"num_cpus": 2 if role == "head" else 1, "resources": resources, "env_vars": env,
                "object_store_memory": 80 * 2**20}  # fmt: skip

    def add_generator_node(self, name: str | None = None) -> Node:
        """A node that generators can run on (a GPU node's stand-in); returns it once it is alive."""
        assert self.cluster is not None
        self._generators_added += 1
        name = name or f"gpu-{self._generators_added}"
        args = self._node_args(name, "generator", free_port())
        self.nodes[name].ray_node = self.cluster.add_node(**args)
        self.log(f"node {name} (generator) joined, proxy on {self.nodes[name].url}")
        return self.nodes[name]

    def add_api_node(self, name: str, port: int | None = None) -> Node:
        """A second (third...) API node; `port`: its proxy's (a node started again keeps its port)."""
        assert self.cluster is not None
        args = self._node_args(name, "api", port or free_port())
        self.nodes[name].ray_node = self.cluster.add_node(**args)
        self.log(f"node {name} (API) joined, proxy on {self.nodes[name].url}")
        return self.nodes[name]

    def start(self, *, wait_ready: bool = True, timeout_s: float = 300) -> LocalCluster:
        import ray
        from ray.cluster_utils import Cluster

        self.root.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self.redis = EmbeddedRedis(self.root / "redis")
        self.redis.start()
        self.log(f"redis at {self.redis.url} (append-only, also the head's GCS storage)")
        if self.storage == "s3":
            self._start_s3()
            self.log(f"S3 bucket {BUCKET} at {self.s3_endpoint}")
        head_args = self._node_args("head", "head", free_port())
        head_args["include_dashboard"] = False
        # GCS fault tolerance: the head's GCS keeps its tables in this Redis (read when the head starts)
        gcs_env = {"RAY_REDIS_ADDRESS": f"127.0.0.1:{self.redis.port}",
                   "RAY_external_storage_namespace": "musicgen-local"}  # fmt: skip
        with _environ(gcs_env):
            self.cluster = Cluster(initialize_head=True, head_node_args=head_args)
        self.head.ray_node = self.cluster.head_node
        self.log(f"node head (API) up, proxy on {self.head.url}")
        for i in range(2, self.api_nodes + 1):
            self.add_api_node(f"api-{i}")
        for _ in range(self.generator_nodes):
            self.add_generator_node()
        ray.init(address=self.cluster.address, log_to_driver=False)
        self.deploy()
        if wait_ready and self.generator_nodes:
            self.wait_ready(timeout_s - (time.monotonic() - started))
        self.log(f"cluster up in {time.monotonic() - started:.0f} s: API at {self.head.url}")
        return self

    def app_config(self) -> tuple[dict, dict]:
        """(serve options, the app's args): serve_config.yaml as a cluster deploys it (HTTP on every
        interface), with this cluster's settings added."""
        from deployments.serve.config import serve_config

        config = serve_config(host="0.0.0.0")
        (app,) = config["applications"]
        if app["import_path"] != "deployments.serve.app:build_app":
            raise ValueError(f"serve_config.yaml imports {app['import_path']}, not the app builder")
        storage = f"s3://{BUCKET}/songs" if self.storage == "s3" else None
        args = {
            **app.get("args", {}),
            "model": self.model,
            "redis_url": self.redis_url,
            **({"storage_url": storage} if storage else {}),
            "generator_gpus": 0,
            "generator_resources": {GENERATOR_RESOURCE: 1},
            "api_resources": {API_RESOURCE: 1},
            "min_ingress": self.api_nodes,
            "max_ingress": self.api_nodes,
            "max_ingress_per_node": 1,
            # none while no node can hold one: Serve would wait for that replica before it deploys
            # the rest (the app scales a generator up once a generator node joins and a song waits)
            "min_generators": 1 if self.generator_nodes else 0,
            "max_generators": max(1, self.generator_nodes),
            "lease_s": self.lease_s,
            **self.app_args,
        }
        options = {"proxy_location": config["proxy_location"],
                   "http_options": {**config["http_options"], "port": self.head.port}}  # fmt: skip
        return {"options": options, "name": app["name"], "route_prefix": app["route_prefix"]}, args

    def deploy(self) -> None:
        from ray import serve

        from deployments.serve.app import build_app

        serve_opts, args = self.app_config()
        serve.start(**serve_opts["options"])
        # the builder runs here: the admin key is registered from MUSICGEN_API_KEYS
        with _environ({"MUSICGEN_API_KEYS": f"cluster-admin:admin:{self.api_key}"}):
            app = build_app(args)
        serve.run(app, name=serve_opts["name"], route_prefix=serve_opts["route_prefix"], blocking=False)
        self.log("app deployed")

    def wait_ready(self, timeout_s: float = 300, node: Node | None = None) -> dict:
        import httpx

        url = (node or self.head).url
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{url}/readyz", timeout=5)
                last = r.text
                if r.status_code == 200:
                    return r.json()
            time.sleep(0.5)
        raise TimeoutError(f"{url}/readyz not ready after {timeout_s:.0f} s: {last}")

    # -- faults ------------------------------------------------------------------------------------
    def node_pids(self, name: str) -> list[int]:
        """Every process of node `name` (its raylet, its workers and their children)."""
        mark = f"{NODE_MARK}={name}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                with contextlib.suppress(OSError):
                    if mark in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                        pids.append(int(entry))
        return pids

    def kill_node(self, name: str) -> int:
        """Kill every process of a node at once (SIGKILL, no graceful stop); returns how many."""
        node = self.nodes.pop(name)
        if node.role == "head":
            raise ValueError("the head holds the driver's connection: restart its GCS instead")
        pids = self.node_pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert self.cluster is not None
        with contextlib.suppress(Exception):  # its processes are gone: this only forgets them
            self.cluster.remove_node(node.ray_node, allow_graceful=False)
        self.log(f"node {name} killed ({len(pids)} processes)")
        return len(pids)

    def restart_gcs(self, down_s: float = 2.0) -> None:
        """Kill the head's GCS server (SIGKILL) and start it again on the same Redis, after `down_s`."""
        assert self.cluster is not None
        head = self.cluster.head_node
        head.kill_gcs_server()
        self.log("head GCS killed")
        time.sleep(down_s)
        with _environ({"RAY_external_storage_namespace": "musicgen-local"}):
            head.start_gcs_server()
        self.log("head GCS restarted from Redis")

    # -- teardown ----------------------------------------------------------------------------------
    def stop(self) -> None:
        import ray

        with contextlib.suppress(Exception):  # (no graceful Serve shutdown: every process is killed)
            ray.shutdown()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.shutdown()
        for name in list(self.nodes):  # anything a dead raylet left behind
            for pid in self.node_pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.s3 is not None:
            with contextlib.suppress(Exception):
                self.s3.stop()
        if self.redis is not None:
            self.redis.stop()
        self.log("cluster stopped")

    def describe(self) -> dict:
        return {
            "api": self.head.url,
            "api_key": self.api_key,
            "ray_address": self.cluster.address if self.cluster else None,  # for `ray start --address`
            "redis_url": self.redis_url,
            "s3_endpoint": self.s3_endpoint,
            "nodes": {
                n.name: {"role": n.role, "url": n.url, "data_dir": str(n.data_dir)}
                for n in self.nodes.values()
            },
        }

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/local-cluster", help="every node's data, Redis's and the logs")
    ap.add_argument("--api-nodes", type=int, default=2, help="API nodes, the head included")
    ap.add_argument("--generator-nodes", type=int, default=2)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--storage", choices=("s3", "local"), default="s3")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if args.model == "tiny" else "0")
    cluster = LocalCluster(args.root, api_nodes=args.api_nodes, generator_nodes=args.generator_nodes,
                           model=args.model, storage=args.storage)  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the cluster, also while it starts
    try:
        cluster.start(wait_ready=args.generator_nodes > 0)
        info = cluster.describe()
        (cluster.root / "cluster.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info, indent=2))
        print(f"\ntry: curl -H 'Authorization: Bearer {cluster.api_key}' {cluster.head.url}/v1/models")
        print("Ctrl-C stops the cluster", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
