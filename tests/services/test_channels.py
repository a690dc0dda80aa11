"""services.common.server: the options every outbound channel gets."""


def test_dns_targets_balance_round_robin_and_others_keep_the_default(monkeypatch):
    """A headless Kubernetes Service (``dns:///`` target) spreads requests over its pods."""
    import grpc

    from services.common import server, tls

    seen = {}

    def capture(kind):
        def channel(address, *args, options=()):
            seen[(kind, address)] = dict(options)
        return channel

    monkeypatch.setattr(grpc.aio, "insecure_channel", capture("plain"))
    server.open_channel("dns:///parm-data.parm.svc:50061", tls=tls.TlsConfig())
    server.open_channel("127.0.0.1:50061", tls=tls.TlsConfig())
    assert seen[("plain", "dns:///parm-data.parm.svc:50061")]["grpc.lb_policy_name"] == "round_robin"
    assert "grpc.lb_policy_name" not in seen[("plain", "127.0.0.1:50061")]
    assert seen[("plain", "127.0.0.1:50061")]["grpc.max_reconnect_backoff_ms"] == 1000
