"""``tidegate serve --ray``: the config as Serve applications, and their lifecycle.

Each model is its own Serve application (``tidegate.<model>``, see
:func:`~tidegate.cluster.wire.app_name`) with one deployment of
:class:`~tidegate.cluster.replica.ModelReplica`, sized by ``[models.scaling]``; they are
deployed dependencies first, then by ``priority``. A small actor, the hub, collects the
replicas' reports. Requests enter through :class:`~tidegate.cluster.wire.Ingress`: tidegate's
own server in this process (the default), or Serve's proxy in front of the ingress app as one
more deployment. On SIGINT/SIGTERM the ingress drains as a single-process server does, then the
applications are deleted (Serve drains their replicas) and, if this process started Ray, Ray is
stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from tidegate.clock import Clock, MonotonicClock
from tidegate.cluster.coalesce import Coalescer, QueueFull
from tidegate.cluster.hub import HUB_NAMESPACE, MetricsHub, hub_name
from tidegate.cluster.ingress import ReplicaStream, create_ingress_app
from tidegate.cluster.replica import ModelReplica
from tidegate.cluster.wire import (
    APP_PREFIX,
    Forwarded,
    Ingress,
    ReplicaReport,
    ResponseHead,
    app_name,
    calls_per_replica,
    deploy_order,
    deployment_options,
)
from tidegate.config import Config, ModelConfig
from tidegate.errors import (
    ConfigError,
    InvalidRequest,
    ModelUnavailable,
    UpstreamBadGateway,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = ["Deployer", "HandleReplicas", "deploy_models", "remove_models", "serve_on_ray"]

log = logging.getLogger("tidegate.cluster")

_REPORTS_TTL_S = 0.5
"""How long the ingress reuses the hub's reports (a scrape storm costs the hub one call)."""

_REPLICA_COUNT_TTL_S = 2.0
"""How old the replica count that sizes calls in flight may grow before it is read again."""

_CALL_MARGIN_S = 5.0
"""A coalesced call's own bound, beyond the replica's ``request_timeout_s``."""

_RUNTIME_ENV = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}}


def _ray_failures() -> tuple[type[BaseException], ...]:
    """What a handle call raises when Serve, not the replica's answer, failed it."""
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    return (RayError, RayServeException)


def _replica_died() -> tuple[type[BaseException], ...]:
    from ray import exceptions

    return (exceptions.ActorDiedError, exceptions.ActorUnavailableError,
            exceptions.RayActorError, exceptions.NodeDiedError, exceptions.ObjectLostError,
            exceptions.OwnerDiedError)


class _HandleStream:
    """A replica's streamed answer through a Serve streaming handle."""

    def __init__(self, head: ResponseHead, generator: Any, model: str) -> None:
        self.head = head
        self._generator = generator
        self._model = model

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._generator:
                yield chunk
        except _ray_failures() as exc:
            what = "was lost" if isinstance(exc, _replica_died()) else "failed"
            raise UpstreamBadGateway(
                f"The replica serving model '{self._model}' {what} mid-stream: "
                f"{type(exc).__name__}.", model=self._model, replica=None) from None

    async def aclose(self) -> None:
        self._generator.cancel()


class HandleReplicas:
    """:class:`~tidegate.cluster.ingress.Replicas` on Serve's deployment handles. Whole
    answers travel coalesced (:class:`~tidegate.cluster.coalesce.Coalescer`), streams one
    call each. Every wait is bounded; a lost replica is a 503 with Retry-After (a coalesced
    call is retried once first if its replica died before answering), Serve's full queue a
    503."""

    def __init__(self, config: Config, hub: str, prefix: str, *,
                 deployer: Deployer | None = None, clock: Clock | None = None) -> None:
        self._config = config
        self._clock = clock or MonotonicClock()
        self._prefix = prefix
        self._models = {m.id: m for m in config.models}
        self._deployer = deployer
        self._unloaded: set[str] = set()

        self._handles: dict[str, Any] = {}  # made on first use (see _handle)
        self._streams: dict[str, Any] = {}
        self._calls_per_replica = {m.id: calls_per_replica(config, m) for m in config.models}
        self._coalescers = {
            m.id: Coalescer(functools.partial(self._send, m.id),
                            max_items=m.batching.max_batch_size,
                            max_in_flight=functools.partial(self._max_calls, m.id),
                            max_pending=m.scaling.max_queued_requests)
            for m in config.models
        }
        self._call_timeout_s = config.server.request_timeout_s + _CALL_MARGIN_S
        self._hub_name = hub
        self._hub: Any = None
        self._reports: tuple[float, Sequence[ReplicaReport]] = (-math.inf, ())  # never read
        self._refresh: asyncio.Task[None] | None = None

    def _failure(self, model: str, exc: BaseException) -> Exception:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if isinstance(exc, DeploymentUnavailableError):
            return UpstreamUnavailable(
                f"Model '{model}' has no replica Serve can route to (its deployment failed, or "
                "it is being removed).", model=model, replica=None, retry_after_s=1)
        if isinstance(exc, BackPressureError):
            return UpstreamUnavailable(
                f"Every replica of model '{model}' is busy and its queue is full "
                "([models.scaling] max_queued_requests).", model=model, replica=None,
                retry_after_s=1)
        if isinstance(exc, _replica_died()):
            return UpstreamUnavailable(
                f"The replica serving model '{model}' was lost ({type(exc).__name__}); Serve "
                "is replacing it.", model=model, replica=None, retry_after_s=1)
        return UpstreamBadGateway(f"The replica serving model '{model}' failed: "
                                  f"{type(exc).__name__}.", model=model, replica=None)

    def _handle(self, model: str, *, stream: bool = False) -> Any:
        """``model``'s deployment handle (a streaming one with ``stream``), made on first use
        and again after an admin's load, which creates a new application."""
        handles = self._streams if stream else self._handles
        found = handles.get(model)
        if found is None:
            from ray import serve

            found = serve.get_app_handle(app_name(model, self._prefix))
            found = found.options(stream=True) if stream else found
            handles[model] = found
        return found

    def _check_loaded(self, model: str) -> None:
        if model in self._unloaded:
            raise ModelUnavailable(model, f"an admin unloaded it; POST /admin/models/{model}/load "
                                          "deploys its replicas again")

    async def set_loaded(self, model: str, loaded: bool) -> None:
        """The admin's load and unload: deploy ``model``'s application again, as its
        ``[models.scaling]`` says, or delete it (Serve drains its replicas; its requests get
        503 at once meanwhile, not a wait for a replica)."""
        if self._deployer is None:
            raise InvalidRequest(
                "With --ingress serve, each model's replicas are managed by Serve alone: set its "
                "[models.scaling] and redeploy.", param="model_id", code="not_supported_on_ray")
        if loaded:
            await asyncio.to_thread(self._deployer.deploy, self._models[model])
            self._handles.pop(model, None)  # handles made afresh for the new application
            self._streams.pop(model, None)
            self._unloaded.discard(model)
        else:
            self._unloaded.add(model)  # refuse new requests first; Serve drains the rest
            name = self._deployer.name(model)
            await asyncio.to_thread(remove_models, [name],
                                    timeout_s=self._config.server.shutdown_timeout_s)
        self._reports = (0.0, ())  # the next read sees the change

    async def call(self, model: str, request: Forwarded, timeout_s: float, *,
                   coalesce: bool = True) -> tuple[ResponseHead, bytes]:
        self._check_loaded(model)
        try:
            async with asyncio.timeout(timeout_s):
                if coalesce:
                    return await self._coalescers[model].submit(request)
                answers = await self._send(model, [request], method="forward_unary")
                return answers[0]
        except TimeoutError:
            raise UpstreamTimeout(f"No replica of model '{model}' answered within "
                                  f"{timeout_s:g}s.", model=model, replica=None) from None
        except QueueFull as exc:
            raise UpstreamUnavailable(
                f"{exc.pending} requests for model '{model}' already wait for a replica "
                "([models.scaling] max_queued_requests).", model=model, replica=None,
                retry_after_s=1) from None

    async def _send(self, model: str, requests: Sequence[Forwarded], *,
                    method: str = "forward_many") -> list[tuple[ResponseHead, bytes]]:
        """One call carrying ``requests`` (``forward_unary``: exactly one); retried once if
        its replica died before answering."""
        for attempt in (1, 2):
            handle = getattr(self._handle(model), method)
            response: Any = handle.remote(list(requests) if method == "forward_many"
                                          else requests[0])
            try:
                async with asyncio.timeout(self._call_timeout_s):
                    answer: Any = await response
                return list(answer) if method == "forward_many" else [answer]
            except BaseException as exc:
                if not isinstance(exc, _ray_failures()):  # timed out, cancelled, a bug
                    response.cancel()
                    raise
                if attempt == 1 and isinstance(exc, _replica_died()):
                    log.warning("a replica of %s was lost before answering; retrying once",
                                model)
                    continue
                raise self._failure(model, exc) from None
        raise AssertionError("unreachable")

    def _max_calls(self, model: str) -> int:
        """Calls in flight per model, per replica reporting: two (one computing, the next on
        its way), or for an autoscaled model one more than its ``target_ongoing_requests``,
        so that the autoscaler can see demand above its target."""
        at, reports = self._reports
        if self._clock.now() - at > _REPLICA_COUNT_TTL_S and self._refresh is None:
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_reports())
        return self._calls_per_replica[model] * max(
            1, sum(report.model == model for report in reports))

    async def _refresh_reports(self) -> None:
        try:
            await self.reports()
        finally:
            self._refresh = None

    async def stream(self, model: str, request: Forwarded, timeout_s: float
                     ) -> ReplicaStream:
        self._check_loaded(model)
        generator: Any = self._handle(model, stream=True).forward.remote(request)
        try:
            async with asyncio.timeout(timeout_s):
                head = await generator.__anext__()
        except BaseException as exc:  # timed out, failed, or cut by the drain: stop it there
            generator.cancel()
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(f"No replica of model '{model}' answered within "
                                      f"{timeout_s:g}s.", model=model, replica=None) from None
            if isinstance(exc, _ray_failures()):
                raise self._failure(model, exc) from None
            raise
        assert isinstance(head, ResponseHead)
        return _HandleStream(head, generator, model)

    async def reports(self) -> Sequence[ReplicaReport]:
        at, reports = self._reports
        if self._clock.now() - at < _REPORTS_TTL_S:
            return reports
        try:
            if self._hub is None:
                import ray

                self._hub = ray.get_actor(self._hub_name, namespace=HUB_NAMESPACE)
            async with asyncio.timeout(2.0):
                reports = await self._hub.reports.remote()
        except Exception as exc:  # the hub is gone: no replica is known to be serving
            log.warning("the metrics hub did not answer: %s", exc)
            self._hub = None
            reports = ()
        self._reports = (self._clock.now(), reports)
        return reports


# -- deploying -----------------------------------------------------------------------------------


class Deployer:
    """Deploys the config's models as Serve applications (``<prefix>.<model>``)."""

    def __init__(self, config: Config, *, hub: str, prefix: str) -> None:
        self._config = config
        self._hub = hub
        self._prefix = prefix

    def name(self, model_id: str) -> str:
        return app_name(model_id, self._prefix)

    def deploy(self, model: ModelConfig) -> str:
        """Deploy ``model`` as its ``[models.scaling]`` says and wait until it runs."""
        from ray import serve

        options = deployment_options(self._config, model)
        options["ray_actor_options"] = {**options["ray_actor_options"],
                                        "runtime_env": _RUNTIME_ENV}
        deployment: Any = serve.deployment(ModelReplica, **options)
        name = self.name(model.id)
        log.info("deploying %s as Serve application %s", model.id, name)
        serve.run(deployment.bind(self._config, model.id, self._hub), name=name,
                  route_prefix=None, logging_config={
                      "log_level": self._config.server.log_level.upper(),
                      "enable_access_log": self._config.server.access_log})
        return name


def deploy_models(config: Config, *, hub: str, prefix: str) -> list[str]:
    """Deploy every model (dependencies first) and wait until each is running; returns the
    Serve applications' names."""
    deployer = Deployer(config, hub=hub, prefix=prefix)
    return [deployer.deploy(model) for model in deploy_order(config)]


def _deploy_serve_ingress(config: Config, hub: str, prefix: str) -> None:
    """tidegate's ingress app as a deployment behind Serve's HTTP proxy."""
    from ray import serve

    def build() -> Any:
        return create_ingress_app(config, HandleReplicas(config, hub, prefix))

    ingress: Any = serve.deployment(serve.ingress(build)(), name="ingress",
                               ray_actor_options={"num_cpus": 0, "runtime_env": _RUNTIME_ENV},
                               max_ongoing_requests=config.server.max_connections,
                               graceful_shutdown_timeout_s=config.server.shutdown_timeout_s)
    serve.run(ingress.bind(), name=prefix, route_prefix="/",
              logging_config={"log_level": config.server.log_level.upper(),
                              "enable_access_log": config.server.access_log})


def remove_models(names: Sequence[str], *, timeout_s: float) -> None:
    """Delete the applications, last deployed first (the ingress before the models it calls),
    each waited for (Serve drains its replicas), all within ``timeout_s``."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    for name in reversed(names):
        try:
            serve.delete(name, _blocking=False)
            while time.monotonic() < deadline and name in serve.status().applications:
                time.sleep(0.2)
        except Exception as exc:
            log.warning("could not delete Serve application %s: %s", name, exc)
    try:
        left = sorted(set(names) & set(serve.status().applications))
    except Exception as exc:
        log.warning("could not read Serve's status: %s", exc)
        return
    if left:
        log.warning("Serve applications still being deleted after %gs: %s", timeout_s,
                    ", ".join(left))


@contextlib.contextmanager
def _ray(address: str | None) -> Iterator[None]:
    import ray

    started = not ray.is_initialized()
    if started:
        # address None: a new local single-node Ray (not one RAY_ADDRESS or an earlier
        # `ray start` points at), stopped again when we exit.
        ray.init(address=address or "local", include_dashboard=False, namespace=HUB_NAMESPACE,
                 logging_level=logging.WARNING, log_to_driver=True)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _wait_for_signal() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_hub(name: str) -> Any:
    """This deployment's hub, owned by this process and pinned to its node (so it goes only
    when the process goes, not with a worker node); refuses to start a second deployment under
    the same name on one cluster."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    with contextlib.suppress(ValueError):
        ray.get_actor(name, namespace=HUB_NAMESPACE)
        raise ConfigError(f"another 'tidegate serve --ray' runs under the name "
                          f"{name.removesuffix('-hub')!r} on this cluster; stop it, or pass "
                          "--ray-app with another name")
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(MetricsHub).options(
        name=name, namespace=HUB_NAMESPACE, scheduling_strategy=here).remote()


def _check_proxy(config: Config) -> None:
    """Serve's HTTP settings are the cluster's, fixed when Serve first started on it: refuse
    to claim a port Serve's proxy is not serving."""
    from ray import serve

    proxies = serve.status().proxies
    if not proxies:
        raise ConfigError("--ingress serve: Serve already runs on this cluster without an HTTP "
                          "proxy (another deployment started it with --ingress tidegate); use "
                          "--ingress tidegate, or restart Serve ('serve shutdown')")
    client: Any = serve.context._get_global_client()  # ray==2.60 pinned: no public getter
    options = client.http_config
    if (options.host, options.port) != (config.server.host, config.server.port):
        raise ConfigError(f"--ingress serve: Serve's proxy on this cluster already serves "
                          f"{options.host}:{options.port}, not {config.server.host}:"
                          f"{config.server.port}; use that address, or --ingress tidegate")


def serve_on_ray(config: Config, *, address: str | None, ingress: Ingress,
                 prefix: str = APP_PREFIX) -> None:
    """Deploy ``config`` on the Ray cluster at ``address`` (``None``: start a local one) as
    the Serve applications ``<prefix>.<model>``, serve until SIGINT/SIGTERM, then remove them.
    """
    import ray
    from ray import serve

    hub = hub_name(prefix)
    with _ray(address):
        hub_actor = _start_hub(hub)
        names: list[str] = []
        try:
            if ingress is Ingress.SERVE:
                # One proxy, on the head node: Serve's proxies all bind the same port, so one
                # per node needs one machine per node (put a load balancer in front instead).
                serve.start(proxy_location="HeadOnly", http_options={
                    "host": config.server.host, "port": config.server.port})
                _check_proxy(config)
            else:
                serve.start(proxy_location="Disabled")
            names = deploy_models(config, hub=hub, prefix=prefix)
            if ingress is Ingress.SERVE:
                _deploy_serve_ingress(config, hub, prefix)
                names.append(prefix)
                log.info("tidegate on Ray Serve: Serve's proxy listens on http://%s:%d",
                         config.server.host, config.server.port)
                _wait_for_signal()
                log.info("removing the applications")
            else:
                from tidegate.server import serve as serve_http

                deployer = Deployer(config, hub=hub, prefix=prefix)
                replicas = HandleReplicas(config, hub, prefix, deployer=deployer)
                app = create_ingress_app(config, replicas)
                serve_http(config, app=app)
        finally:  # also on a signal during start-up (KeyboardInterrupt)
            remove_models(names, timeout_s=config.server.shutdown_timeout_s)
            with contextlib.suppress(Exception):
                ray.kill(hub_actor)
            log.info("tidegate on Ray Serve: applications removed")
