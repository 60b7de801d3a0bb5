"""tidegate on Ray Serve (``tidegate serve --ray``): the same ``tidegate.toml`` as a Serve
application, one deployment per model, batching inside each replica.

* :mod:`~tidegate.cluster.wire`: what crosses process boundaries (requests, response heads,
  replica reports) and the pure decisions about names and per-replica configs.
* :mod:`~tidegate.cluster.replica`: a model replica: tidegate's own app for one model, driven
  in process, request by request.
* :mod:`~tidegate.cluster.ingress`: the HTTP front: keys, limits and routing to the replicas'
  handles, one ``/metrics`` and one ``/v1/models`` for the application.
* :mod:`~tidegate.cluster.hub`: a small actor where replicas report their model card and
  metrics.
* :mod:`~tidegate.cluster.promtext`: merging Prometheus expositions, labelled by replica.
* :mod:`~tidegate.cluster.deploy`: the Serve deployments made from the config, and the
  ``serve --ray`` lifecycle.

Only :mod:`~tidegate.cluster.deploy` and :mod:`~tidegate.cluster.replica` import Ray, and only
when they run: ``ray[serve]`` is an optional extra (``pip install 'tidegate[ray]'``).
"""
