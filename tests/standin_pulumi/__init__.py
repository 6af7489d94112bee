"""A stand-in for the Pulumi CLI and the clouds behind it, for tests only.

The real CLI and the Exoscale provider plugin cannot be had here, so `pulumi.automation` drives
this instead: select it with `PulumiCommand(root="tests/standin_pulumi")` (the SDK runs
`bin/pulumi`). It speaks the CLI's side of the automation protocol: for `up` it calls the SDK's
`LanguageRuntime.Run` at `--client`, serves the `ResourceMonitor` and `Engine` the program talks
to, and streams engine events to `--event-log`. Resources are "created" in a simulated cloud
kept next to the state, in the `file://` backend directory (`standin-cloud.json`); a compute
instance "boots" by starting `python -m tests.fake_ollama` with the stack's TLS certificate and
token, and is stopped when destroyed.

Modules: `__main__` (the command line), `backend` (workspace, file backend, locks, plugins),
`engine` (up/refresh/destroy, the gRPC services, events), `cloud` (the simulated providers);
`harness` and `crash` help the tests that use it.

Knobs (environment of the CLI process):
  STANDIN_PULUMI_VERSION  what `pulumi version` says (default 3.272.0, see cli.VERSION)
  STANDIN_BOOT_DELAY      seconds before a new instance's Ollama listens (default 0)
  STANDIN_TAGS_DELAY      seconds more before it lists its models (default 0)
  STANDIN_MODELS          the models it lists (default llama3.2)
  STANDIN_INSTANCE_PORT   the port it serves on (default: the non-SSH port its firewall opens)
  STANDIN_FAIL_UP         make `up` fail creating the compute instance with this provider error
  STANDIN_FAIL_UP_FILE    the same, with the error read from this file while it exists
  STANDIN_UP_HANG         `up` hangs once the cloud has created the instance, leaving the lock
                          and a pending create in the state (the test kills the process)
"""
