"""Running a sweep on a fleet of EC2 instances (``python -m deploy.aws``).

Modules, one concern each:

- ``settings``: ``AwsSettings``, the AWS side of a launch (region, zones,
  subnets, key pair, AMI, spot or on-demand, bucket), from flags and env.
- ``plan``: the fleet a sweep config needs and what it costs (``prices``).
- ``session``: boto3 clients (endpoint override for tests) and the
  translation of AWS errors into one-line ``AwsError`` messages.
- ``network``, ``iam``, ``storage``, ``instances``: security group, instance
  profile, the experiment's S3 prefix, launching/reusing/tagging/terminating.
- ``userdata`` + ``bootstrap``: the boot script of each role; ``bootstrap``
  is standard-library only (its own SigV4 S3 client) and runs on the image's
  bare ``python3`` (3.10 on the GPU image) before anything is installed.
- ``node``: what runs *on* the instances (ready reports, the sweep runner,
  the fleet's self-stop).
- ``cli``: ``launch | status | results | terminate``.

Nothing here runs at import; boto3 is imported by the functions that use it.
"""
