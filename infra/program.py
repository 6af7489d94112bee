"""The GPU servers, declared: what `pulumi up` creates, one declaration per resource.

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

from .checks import PRIMARY
from .cloudinit import TLS_SERVER_NAME, render_user_data
from .names import model_volume_name, server_object_name
from .settings import Settings

TOKEN_LENGTH = 48
# The certificate is pinned by the proxy, so its age does not weaken it; the server lives for
# hours, the stack may live for years (idle action `stop`).
TLS_VALIDITY_HOURS = 10 * 365 * 24
SSH_PORT = 22


def declare(settings: Settings) -> None:
    """Declare the GPU servers of `settings` (`servers`; else today's one, `gpu`), sharing the
    firewall, token and certificate, and export how to reach them."""
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

    user_data = pulumi.Output.secret(
        pulumi.Output.all(token.result, tls_cert.cert_pem, tls_key.private_key_pem).apply(
            lambda values: render_user_data(settings, *values)
        )
    )
    volumes = {server: model_volume(settings, name, server)
               for server in settings.server_names if settings.model_volume_gb}
    instances = {
        server: gpu_instance(settings, name, server, state, template.id, firewall.id, user_data,
                             volumes.get(server), kept=server in settings.kept)
        for server, state in settings.declared_servers.items()
    }

    # Today's outputs describe the primary, else the first server (names sorted by index).
    shown = PRIMARY if PRIMARY in settings.server_names else settings.server_names[0]
    if shown in volumes:
        pulumi.export("model_volume_id", volumes[shown].id)
    if not instances:  # `absent`: the instances are gone; the rest stays for the next
        return
    shown = shown if shown in instances else next(iter(instances))
    described = {server: describe(instance, settings.port)
                 for server, instance in instances.items()}
    for key, value in described[shown].items():
        pulumi.export(key, value)
    pulumi.export("servers", described)
    pulumi.export("token", pulumi.Output.secret(token.result))
    pulumi.export("tls_certificate", pulumi.Output.unsecret(tls_cert.cert_pem))
    pulumi.export("tls_server_name", TLS_SERVER_NAME)
    pulumi.export("instance_type", settings.instance_type)
    pulumi.export("zone", settings.zone)


def model_volume(settings: Settings, name: str, server: str) -> exoscale.BlockStorageVolume:
    """A server's models' disk: it outlives the instance (kept when idle removes it)."""
    return exoscale.BlockStorageVolume(
        model_volume_name(server),
        zone=settings.zone,
        name=f"{server_object_name(name, server)}-models",
        size=settings.model_volume_gb,
        labels=instance_labels(settings, pulumi.get_stack()),
    )


# What a server kept as it was made does not take from new settings: each would replace it
# (user data, template) or stop it to resize (type, disk).
KEPT_AS_MADE = ["user_data", "template_id", "type", "disk_size"]


def gpu_instance(settings: Settings, name: str, server: str, state: str, template_id, firewall_id,
                 user_data, volume: exoscale.BlockStorageVolume | None, *, kept: bool = False
                 ) -> exoscale.ComputeInstance:
    """One GPU server; `gpu` keeps the logical and cloud names of the one server before fleets.
    `kept`: it stays as it was made, KEPT_AS_MADE unchanged (the update is about another server)."""
    return exoscale.ComputeInstance(
        server,
        name=server_object_name(name, server),
        zone=settings.zone,
        type=settings.instance_type,
        template_id=template_id,
        disk_size=settings.disk_size,
        security_group_ids=[firewall_id],
        user_data=user_data,
        ssh_keys=[settings.ssh_key] if settings.ssh_key else None,
        ipv6=settings.ipv6,
        labels=instance_labels(settings, pulumi.get_stack()),
        state=state,  # `stopped`: disk and models kept, no GPU billed
        block_storage_volume_ids=[volume.id] if volume is not None else None,
        opts=pulumi.ResourceOptions(
            # cloud-init runs once per instance: new user data (models, port) needs a new one.
            replace_on_changes=["user_data"],
            # …except while the update is about another server: this one may be serving.
            ignore_changes=KEPT_AS_MADE if kept else None,
            # The old one goes first: each server is one GPU of the quota (`exo limits`), and
            # a volume attaches to one instance.
            delete_before_replace=True,
        ),
    )


def describe(instance: exoscale.ComputeInstance, port: int) -> dict[str, pulumi.Output]:
    """How to reach one server (no secret: the token and certificate are the stack's)."""
    public_ip = pulumi.Output.unsecret(instance.public_ip_address)
    return {
        "remote_url": pulumi.Output.concat("https://", public_ip, f":{port}"),
        "public_ip": public_ip,
        "instance_id": instance.id,
        "instance_state": instance.state,
    }


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
