"""Running ParM: everything outside the services themselves.

Rooms:

- ``deploy.runner``: the experiment runner (config sweeps, deployments,
  launchers, ``make local`` / ``make serve``, the report);
- ``deploy.network``: background network load (emulated model, real
  shuffles) and the namespace testbed;
- ``deploy.remote``: the node agent through which the runner starts
  processes on other hosts;
- ``deploy.aws``: the EC2 launcher (the only place boto3 is used);
- ``deploy.reliability``: chaos, fuzz, overload and soak benchmarks over one
  shared rig;
- ``deploy.certs``: a private CA and certificates for mutual TLS.
"""
