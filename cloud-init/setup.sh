#!/bin/bash
# ollama-exoscale: brings this GPU server up, then opens its public front.
#
# Rendered by infra/cloudinit.py (the values below were shell-quoted there) and run by
# ollama-exoscale-setup.service at every boot until it succeeds. Every step checks what is
# already done and does only the rest, so a run after a reboot or a failure picks up where the
# last one stopped. The front (nginx, on the public port, TLS and the bearer token) starts as
# soon as it is installed, but serves only the bring-up's progress (/ollama-exoscale/status)
# until every model is pulled; then it lets Ollama through: "/api/tags lists the model" means
# ready. The downloads (the Ollama image, the models) need the network and the disk, not the
# GPU: a CPU-only Ollama container fetches them in the background while the driver installs,
# and Ollama is started with the GPU only once the driver is loaded.
set -euo pipefail

MODELS=({{ models }})
PORT={{ port }}
OLLAMA_IMAGE={{ ollama_image }}
FETCHER=ollama-fetch  # the CPU-only container that pulls the models while the driver installs
MODEL_VOLUME={{ model_volume }}  # 1: the models live on an attached block storage volume
MODELS_DIR=/var/lib/ollama-models  # where that volume is mounted
STATE_DIR={{ state_dir }}
export STATUS_FILE=$STATE_DIR/status.json  # where ollama-exoscale-progress writes
export PROGRESS_TRACK=main  # the track of this script's stages; the downloads have their own
NVIDIA_KEYRING=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
NVIDIA_LIST=/etc/apt/sources.list.d/nvidia-container-toolkit.list
SITE=/etc/ollama-exoscale/nginx-site.conf
PROGRESS=/usr/local/sbin/ollama-exoscale-progress
READY=$STATE_DIR/ready  # the front lets requests through to Ollama only once this exists
FAILED=$STATE_DIR/failed  # the bring-up gave up: why, for every later run to say again
GAVE_UP=3  # the exit status the unit does not restart on (RestartPreventExitStatus)
DRIVER_ATTEMPTS=3  # installs of the NVIDIA driver before the bring-up gives up
PULL_ATTEMPTS=3  # pulls of one model before the bring-up gives up (a misspelt name never pulls)
APT_WAIT=1200  # seconds to wait for another apt (unattended-upgrades at first boot)
DPKG_LOCK=/var/lib/dpkg/lock-frontend  # what every apt and dpkg takes (an fcntl lock)
export DEBIAN_FRONTEND=noninteractive

log() { echo "ollama-exoscale-setup: $*" >&2; }

# say PHASE DETAIL: the progress the front serves to the proxy (never fatal).
say() { "$PROGRESS" say "$@" || log "cannot write the progress"; }

# apt waits for another apt (unattended-upgrades at first boot) instead of failing on its lock.
apt_get() { apt-get -q -o DPkg::Lock::Timeout=1200 "$@"; }

# give_up REASON: a failure that retrying will not fix. The progress document says it, so
# the proxy shows it and removes this server instead of paying for it; the unit stops here.
give_up() {
  local reason="$*"
  log "giving up: $reason"
  echo "$reason" >"$FAILED"
  "$PROGRESS" fail "$reason" || log "cannot write the progress"
  exit "$GAVE_UP"
}

# apt_idle: no apt or dpkg holds the dpkg lock now (they take it with fcntl, as tried here).
apt_idle() {
  python3 -c 'import fcntl, sys
with open(sys.argv[1], "a") as lock:
    fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)' "$DPKG_LOCK" 2>/dev/null
}

# wait_for_apt: until apt is idle, at most APT_WAIT s. ubuntu-drivers runs apt-get without a
# lock timeout, and at first boot unattended-upgrades holds the lock for minutes.
wait_for_apt() {
  local waited=0
  until apt_idle; do
    if [ "$waited" -ge "$APT_WAIT" ]; then
      log "another apt still holds $DPKG_LOCK after $APT_WAIT s"
      return 1
    fi
    [ "$waited" -eq 0 ] && log "waiting for another apt (unattended-upgrades) to finish"
    sleep 5
    waited=$((waited + 5))
  done
}

# driver_installed: an NVIDIA driver package is installed, what `ubuntu-drivers install
# --gpgpu` installs (nvidia-headless-no-dkms-NNN[-server]; a desktop nvidia-driver-NNN too).
driver_installed() {
  local listed
  # shellcheck disable=SC2016 # ${Status} and ${Package} are dpkg-query's fields
  listed=$(dpkg-query -W -f='${Status} ${Package}\n' 'nvidia-headless-*' 'nvidia-driver-*' \
    2>/dev/null || true)  # it fails when one pattern matches no package at all
  grep -q '^install ok installed nvidia-' <<<"$listed"
}

# reset_if_new_instance: a server made from a baked template (ollama-exoscale bake) carries the
# markers of the instance it was baked from; they are that instance's, not this one's.
reset_if_new_instance() {
  local id
  id=$(cat /var/lib/cloud/data/instance-id 2>/dev/null || true)
  if [ -z "$id" ] || [ "$(cat "$STATE_DIR/instance-id" 2>/dev/null || true)" = "$id" ]; then
    return 0
  fi
  rm -f "$READY" "$FAILED" "$STATE_DIR/rebooted-for-driver" "$STATE_DIR/status.json"
  echo "$id" >"$STATE_DIR/instance-id"
}

retry() {  # retry N COMMAND...: downloads fail now and then
  local tries=$1 n=1
  shift
  until "$@"; do
    if [ "$n" -ge "$tries" ]; then return 1; fi
    log "retrying in $((n * 15)) s: $*"
    sleep $((n * 15))
    n=$((n + 1))
  done
}

installed() {  # installed PACKAGE...: all of them are installed
  local package
  for package in "$@"; do
    # shellcheck disable=SC2016 # ${Status} is dpkg-query's field, not a shell variable
    [ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null)" = "install ok installed" ] || return 1
  done
}

install_packages() {
  if installed ca-certificates curl gnupg docker.io nginx ubuntu-drivers-common; then return 0; fi
  say packages "installing Docker, nginx and the driver tools"
  retry 3 apt_get update
  retry 3 apt_get install -y --no-install-recommends \
    ca-certificates curl gnupg docker.io nginx ubuntu-drivers-common
  # Ubuntu starts nginx with its default site: nothing is served before the models are in.
  rm -f /etc/nginx/sites-enabled/default
  systemctl disable --now nginx
}

nvidia_loaded() { [ -e /proc/driver/nvidia/version ]; }

# install_driver: the headless, server-branch driver Ubuntu recommends for this GPU (no X, no
# desktop), checked by its result: noble's ubuntu-drivers exits 0 when it installed nothing
# ("No drivers found", a DKMS-only module skipped), so its exit status says nothing.
install_driver() {
  local n
  for n in $(seq 1 "$DRIVER_ATTEMPTS"); do
    say driver "installing the NVIDIA driver (attempt $n of $DRIVER_ATTEMPTS)"
    wait_for_apt || true  # then ubuntu-drivers fails on the lock, and this attempt with it
    ubuntu-drivers install --gpgpu || log "ubuntu-drivers install --gpgpu failed"
    if driver_installed; then return 0; fi
    log "no NVIDIA driver package is installed after attempt $n"
    if [ "$n" -lt "$DRIVER_ATTEMPTS" ]; then sleep $((n * 15)); fi
  done
  give_up "the NVIDIA driver could not be installed: ubuntu-drivers install --gpgpu left no" \
    "nvidia-headless or nvidia-driver package after $DRIVER_ATTEMPTS attempts"
}

install_nvidia_driver() {
  if nvidia_loaded; then return 0; fi
  if ! driver_installed; then install_driver; fi
  modprobe nvidia || true
  if nvidia_loaded; then return 0; fi
  # Another module (nouveau) holds the GPU until the next boot: reboot once; the unit runs again.
  if [ -e "$STATE_DIR/rebooted-for-driver" ]; then
    give_up "the NVIDIA driver is installed but does not load, even after a reboot"
  fi
  touch "$STATE_DIR/rebooted-for-driver"
  log "rebooting to load the NVIDIA driver"
  say driver "rebooting to load the NVIDIA driver"
  systemctl reboot
  exit 0
}

add_nvidia_repository() {
  # NVIDIA's own apt repository (the toolkit is not in Ubuntu's archive), as NVIDIA documents.
  local list
  list=$(mktemp)
  retry 3 curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey -o "$list.key"
  gpg --batch --yes --dearmor -o "$NVIDIA_KEYRING" "$list.key"
  retry 3 curl -fsSL -o "$list" \
    https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list
  sed "s#deb https://#deb [signed-by=$NVIDIA_KEYRING] https://#g" "$list" >"$NVIDIA_LIST"
  rm -f "$list" "$list.key"
}

install_container_toolkit() {
  if ! command -v nvidia-ctk >/dev/null; then
    say toolkit "installing the NVIDIA container toolkit"
    add_nvidia_repository
    retry 3 apt_get update
    retry 3 apt_get install -y --no-install-recommends nvidia-container-toolkit
  fi
  if ! grep -qs '"nvidia"' /etc/docker/daemon.json; then
    nvidia-ctk runtime configure --runtime=docker
    systemctl restart docker
  fi
}

models_device() {  # the attached volume: the one disk that is not the root disk
  local root disk
  root=$(lsblk -no PKNAME "$(findmnt -no SOURCE /)")
  for disk in $(lsblk -dno NAME,TYPE | awk '$2 == "disk" { print $1 }'); do
    if [ "$disk" != "$root" ]; then
      echo "/dev/$disk"
      return 0
    fi
  done
  return 1
}

mount_models() {
  if [ "$MODEL_VOLUME" != 1 ] || mountpoint -q "$MODELS_DIR"; then return 0; fi
  say volume "mounting the model volume"
  local device="" n
  for n in $(seq 1 30); do  # the volume may show up a little after boot
    if device=$(models_device); then break; fi
    [ "$n" -eq 1 ] && log "waiting for the model volume to appear"
    sleep 2
  done
  if [ -z "$device" ]; then
    log "the model volume is not attached"
    return 1
  fi
  # A new volume has no filesystem yet; one that has (the models of an earlier server) is kept.
  if ! blkid "$device" >/dev/null 2>&1; then
    log "formatting the new model volume $device"
    mkfs.ext4 -q -L ollama-models "$device"
  fi
  mkdir -p "$MODELS_DIR"
  if ! grep -qs "LABEL=ollama-models" /etc/fstab; then
    echo "LABEL=ollama-models $MODELS_DIR ext4 defaults,nofail 0 2" >>/etc/fstab
  fi
  mount "$MODELS_DIR"
}

wait_for_ollama() {  # wait_for_ollama [CONTAINER]: until its Ollama answers (default: ollama)
  local n container=${1:-ollama}
  for n in $(seq 1 60); do
    if docker exec "$container" ollama list >/dev/null 2>&1; then return 0; fi
    [ "$n" -eq 1 ] && log "waiting for Ollama to answer"
    sleep 2
  done
  log "Ollama did not answer within 2 minutes"
  return 1
}

models_volume() {  # a Docker volume on the root disk, or the mounted model volume
  if [ "$MODEL_VOLUME" = 1 ]; then echo "$MODELS_DIR"; else echo ollama; fi
}

pull_image() {
  if docker image inspect "$OLLAMA_IMAGE" >/dev/null 2>&1; then return 0; fi
  say image "pulling the Ollama image"
  retry 3 docker pull "$OLLAMA_IMAGE"
}

# fetch_downloads: the image and every model, by a CPU-only Ollama (no --gpus: the driver is
# not there yet) writing into the models' volume; run in the background of the driver install.
# A reboot for the driver loses nothing finished: the image stays in Docker, the models in the
# volume (and Ollama resumes a partial pull); each model's pull is retried on its own.
fetch_downloads() {
  export PROGRESS_TRACK=fetch  # its stages run beside the main track's
  if docker container inspect ollama >/dev/null 2>&1; then return 0; fi  # fetched before
  pull_image
  docker rm -f "$FETCHER" >/dev/null 2>&1 || true  # one left stopped by a reboot
  # Published on loopback only, where the front sends nothing before ready.
  docker run -d --name "$FETCHER" -v "$(models_volume):/root/.ollama" \
    -p 127.0.0.1:11434:11434 "$OLLAMA_IMAGE" >/dev/null
  wait_for_ollama "$FETCHER"
  pull_models "$FETCHER"
  docker rm -f "$FETCHER" >/dev/null
  "$PROGRESS" end pulling || true
}

start_ollama() {
  # Published on loopback only: Ollama has no authentication; nginx is its only way in.
  say container "starting Ollama with the GPU"
  if ! docker container inspect ollama >/dev/null 2>&1; then
    pull_image
    docker run -d --name ollama --gpus=all --restart unless-stopped \
      -v "$(models_volume):/root/.ollama" -p 127.0.0.1:11434:11434 "$OLLAMA_IMAGE" >/dev/null
  fi
  docker start ollama >/dev/null
  wait_for_ollama
}

pull_model() {  # pull_model MODEL: one try; why it failed is kept in $STATE_DIR/pull-error
  "$PROGRESS" pull "$1" 2>"$STATE_DIR/pull-error.$PROGRESS_TRACK"
}

pull_models() {  # pull_models [CONTAINER]: each model it does not have yet (default: ollama)
  local model container=${1:-ollama}
  for model in "${MODELS[@]}"; do
    if docker exec "$container" ollama show "$model" >/dev/null 2>&1; then continue; fi
    log "pulling model $model"
    # Through Ollama's API on loopback: its percent goes into the progress document. A pull
    # that fails every time (a name Ollama's library does not have) ends the bring-up, which
    # the unit would otherwise restart every 30 s for as long as the GPU is billed.
    if ! retry "$PULL_ATTEMPTS" pull_model "$model"; then
      give_up "pulling $model failed $PULL_ATTEMPTS times" \
        "($(tail -n 1 "$STATE_DIR/pull-error.$PROGRESS_TRACK"));" \
        "check the name in OLLAMA_MODEL"
    fi
  done
}

open_front() {
  rm -f /etc/nginx/sites-enabled/default
  ln -sfn "$SITE" /etc/nginx/sites-enabled/ollama-exoscale
  nginx -t -q
  systemctl enable nginx
  systemctl reload-or-restart nginx
}

mark_ready() {
  # The document first: the proxy reads the phases' times once the front lets it through.
  "$PROGRESS" ready || log "cannot write the progress"
  touch "$READY"
  log "ready: Ollama answers on port $PORT (TLS, bearer token) with ${MODELS[*]}"
}

main() {
  mkdir -p "$STATE_DIR"
  chmod 0755 "$STATE_DIR"  # the front's workers read the progress document in it
  reset_if_new_instance
  if [ -e "$FAILED" ]; then give_up "$(cat "$FAILED")"; fi  # a reboot changes nothing
  if [ -e "$READY" ]; then rm -f "$STATE_DIR/status.json"; fi  # a restart: time this boot only
  say packages "starting the bring-up"
  install_packages
  open_front  # only the progress until $READY exists
  # The toolkit before the downloads: configuring Docker's runtime restarts Docker.
  install_container_toolkit
  mount_models
  fetch_downloads &
  local fetch=$!
  install_nvidia_driver  # meanwhile (a reboot here keeps what is downloaded)
  local fetched=0
  wait "$fetch" || fetched=$?
  if [ "$fetched" -eq "$GAVE_UP" ]; then exit "$GAVE_UP"; fi  # a model that never pulls
  if [ "$fetched" -ne 0 ]; then
    log "the downloads failed (exit $fetched); the unit tries again"
    exit 1
  fi
  start_ollama  # with the GPU, on what was downloaded
  pull_models  # nothing left, unless the volume was lost
  mark_ready
}

main "$@"
