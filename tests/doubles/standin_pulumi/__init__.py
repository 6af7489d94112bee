"""A stand-in for the Pulumi CLI and the clouds behind it, for tests only.

The real CLI and the Exoscale provider plugin cannot be had here, so `pulumi.automation` drives
this instead: select it with `PulumiCommand(root="tests/doubles/standin_pulumi")` (the SDK runs
`bin/pulumi`). It speaks the CLI's side of the automation protocol: for `up` it calls the SDK's
`LanguageRuntime.Run` at `--client`, serves the `ResourceMonitor` and `Engine` the program talks
to, and streams engine events to `--event-log`. Resources are "created" in a simulated cloud
kept next to the state, in the `file://` backend directory (`standin-cloud.json`); a compute
instance (on a loopback address of its own, 127.0.0.1 first: its public IP) boots from its
user data (`server`): the files cloud-init writes, then the bring-up,
whose public front is Debian's nginx with the rendered site in front of `tests.doubles.fake_ollama`;
it is stopped when destroyed.

Modules: `__main__` (the command line), `backend` (workspace, file backend, locks, plugins),
`engine` (up/refresh/destroy, the gRPC services, events), `cloud` (the simulated providers),
`server` (a simulated GPU server); `harness` and `crash` help the tests that use it.

Knobs (environment of the CLI process):
  STANDIN_PULUMI_VERSION  what `pulumi version` says (default 3.272.0, see cli.VERSION)
  STANDIN_BOOT_DELAY      seconds before a booting instance's front listens (default 0)
  STANDIN_PULL_SECONDS    seconds each model its user data names takes to pull (default 0);
                          none when its disk (or attached volume) has the model already
  STANDIN_INSTANCE_PORT   the port it serves on (default: the non-SSH port its firewall opens)
  STANDIN_GIVES_UP        its bring-up gives up with this reason, as setup.sh's `give_up` does
  STANDIN_TEMPLATES       the template names `getTemplate` finds (default: Ubuntu 24.04, 22.04,
                          Debian 12); another name is Exoscale's "resource not found"
  STANDIN_FAIL_UP         make `up` fail creating the compute instance with this provider error
  STANDIN_FAIL_UP_FILE    the same, with the error read from this file while it exists
  STANDIN_UP_HANG         `up` hangs once the cloud has created the instance, leaving the lock
                          and a pending create in the state (the test kills the process)
"""
