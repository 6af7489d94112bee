"""The GPU server, declared: what `pulumi up` creates, one declaration per resource.

`declare(settings)` is the whole Pulumi program. `pulumi up` at the repository root runs it
(through `infra/__main__.py`), and so does the proxy, as the Automation API's inline program.
It only declares: no I/O of its own beyond reading the cloud-init templates it renders.
"""

from __future__ import annotations

import re

import pulumi
import pulumi_random as random
import pulumi_tls as tls
import pulumiverse_exoscale as exoscale

from .cloudinit import TLS_SERVER_NAME, render_user_data
from .settings import Settings

TOKEN_LENGTH = 48
# The certificate is pinned by the proxy, so its age does not weaken it; the server lives for
# hours, the stack may live for years (idle action `stop`).
TLS_VALIDITY_HOURS = 10 * 365 * 24
SSH_PORT = 22


def declare(settings: Settings) -> None:
    """Declare the GPU server of `settings` and export how to reach it."""
    name = object_name(settings, pulumi.get_stack())

    template = exoscale.get_template_output(zone=settings.zone, name=settings.template,
                                            visibility=settings.template_visibility)

    token = random.RandomPassword("token", length=TOKEN_LENGTH, special=False)

    tls_key = tls.PrivateKey("tls-key", algorithm="ECDSA", ecdsa_curve="P256")

    tls_cert = tls.SelfSignedCert(
        "tls-cert",
        private_key_pem=tls_key.private_key_pem,
        dns_names=[TLS_SERVER_NAME],
        subject={"common_name": TLS_SERVER_NAME, "organization": "ollama-exoscale"},
        validity_period_hours=TLS_VALIDITY_HOURS,
        allowed_uses=["digital_signature", "server_auth"],
    )

    firewall = exoscale.SecurityGroup(
        "firewall",
        name=name,
        description="ollama-exoscale: the token-guarded TLS port, from the allowed networks only",
    )

    for cidr in settings.allowed_cidrs:
        exoscale.SecurityGroupRule(
            rule_name("port", cidr),
            security_group_id=firewall.id,
            type="INGRESS",
            protocol="TCP",
            start_port=settings.port,
            end_port=settings.port,
            cidr=cidr,
            description="Ollama behind TLS and the bearer token",
        )

    for cidr in settings.ssh_cidrs if settings.ssh_enabled else ():
        exoscale.SecurityGroupRule(
            rule_name("ssh", cidr),
            security_group_id=firewall.id,
            type="INGRESS",
            protocol="TCP",
            start_port=SSH_PORT,
            end_port=SSH_PORT,
            cidr=cidr,
            description="SSH for the operator",
        )

    # The models' disk, when asked for: it outlives the instance (kept when idle removes it).
    volume = exoscale.BlockStorageVolume(
        "models",
        zone=settings.zone,
        name=f"{name}-models",
        size=settings.model_volume_gb,
        labels=instance_labels(settings, pulumi.get_stack()),
    ) if settings.model_volume_gb else None

    if settings.instance_state == "absent":  # the instance is gone; the rest stays for the next
        if volume is not None:
            pulumi.export("model_volume_id", volume.id)
        return

    user_data = pulumi.Output.secret(
        pulumi.Output.all(token.result, tls_cert.cert_pem, tls_key.private_key_pem).apply(
            lambda values: render_user_data(settings, *values)
        )
    )

    instance = exoscale.ComputeInstance(
        "gpu",
        name=name,
        zone=settings.zone,
        type=settings.instance_type,
        template_id=template.id,
        disk_size=settings.disk_size,
        security_group_ids=[firewall.id],
        user_data=user_data,
        ssh_keys=[settings.ssh_key] if settings.ssh_key else None,
        ipv6=settings.ipv6,
        labels=instance_labels(settings, pulumi.get_stack()),
        state=settings.instance_state,  # `stopped`: disk and models kept, no GPU billed
        block_storage_volume_ids=[volume.id] if volume is not None else None,
        opts=pulumi.ResourceOptions(
            # cloud-init runs once per instance: new user data (models, port) needs a new one.
            replace_on_changes=["user_data"],
            # The old one goes first: a GPU quota of one, and a volume attaches to one instance.
            delete_before_replace=True,
        ),
    )

    public_ip = pulumi.Output.unsecret(instance.public_ip_address)
    pulumi.export("remote_url", pulumi.Output.concat("https://", public_ip, f":{settings.port}"))
    pulumi.export("public_ip", public_ip)
    pulumi.export("instance_id", instance.id)
    pulumi.export("instance_state", instance.state)
    pulumi.export("token", pulumi.Output.secret(token.result))
    pulumi.export("tls_certificate", pulumi.Output.unsecret(tls_cert.cert_pem))
    pulumi.export("tls_server_name", TLS_SERVER_NAME)
    pulumi.export("instance_type", settings.instance_type)
    pulumi.export("zone", settings.zone)
    if volume is not None:
        pulumi.export("model_volume_id", volume.id)


def object_name(settings: Settings, stack: str) -> str:
    """The cloud objects' name: the prefix, plus the stack unless the stack has that name."""
    stack = re.sub(r"[^a-z0-9-]+", "-", stack.lower()).strip("-")
    name = settings.name if stack in ("", settings.name) else f"{settings.name}-{stack}"
    return name[:63].rstrip("-")  # a hostname label


def instance_labels(settings: Settings, stack: str) -> dict[str, str]:
    """The settings' labels (with `managed-by`), plus the stack: how orphans are found."""
    return {**settings.labels, "stack": stack}


def rule_name(kind: str, cidr: str) -> str:
    """A rule's logical name, from its network (stable when the list is reordered)."""
    return f"{kind}-from-" + re.sub(r"[^0-9A-Za-z.]+", "-", cidr).strip("-")
