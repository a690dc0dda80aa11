"""Remote hosts: the node agent that starts processes on a host for the
runner (``AgentLauncher``), used by the AWS fleet."""
