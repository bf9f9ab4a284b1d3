#!/usr/bin/env bash
# Build the component image (infra/Dockerfile) and the MLflow image (infra/mlflow.Dockerfile) from the
# committed tree (HEAD) and the hash-pinned locks. An image whose inputs (Dockerfile, lock, base image,
# code at HEAD) are those it was built from is kept as it is, so a second run takes seconds.
#   env: BASE (default python:3.11-slim, else kftune-base:bookworm from `make image-base`), IMAGE (kftune:0.1.0), MLFLOW_IMAGE (kftune-mlflow:3.17.2),
#        TORCH (cpu, or cuda: PyPI's CUDA torch instead of the locked CPU wheel), PYTHON (the host's pip)
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE="${IMAGE:-kftune:0.1.0}"
MLFLOW_IMAGE="${MLFLOW_IMAGE:-kftune-mlflow:3.17.2}"
TORCH="${TORCH:-cpu}"
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
commit="$(git rev-parse HEAD)"
inputs=(infra/Dockerfile infra/mlflow.Dockerfile requirements.lock infra/mlflow.lock pyproject.toml kftune components
        pipelines)
if [[ -n "$(git status --porcelain --untracked-files=no -- "${inputs[@]}")" ]]; then
  echo "note: the images are built from HEAD ($commit); uncommitted changes to these are not in them:" >&2
  git status --short --untracked-files=no -- "${inputs[@]}" >&2
fi
if [[ -z "${BASE:-}" ]]; then  # python:3.11-slim if a registry has it, else the stand-in `make image-base` built
  BASE=python:3.11-slim
  if ! docker image inspect "$BASE" >/dev/null 2>&1 && docker image inspect kftune-base:bookworm >/dev/null 2>&1; then
    BASE=kftune-base:bookworm
  fi
fi
docker image inspect "$BASE" >/dev/null 2>&1 || docker pull "$BASE" >/dev/null \
  || { echo "no base image $BASE here and none to pull: make image-base builds one" >&2; exit 1; }
echo "base image: $BASE"
base_id="$(docker image inspect -f '{{.Id}}' "$BASE")"
key_of() { { echo "$base_id $TORCH"; for p in "$@"; do git rev-parse "HEAD:$p"; done; } | sha256sum | cut -c1-24; }
image_key="$(key_of infra/Dockerfile requirements.lock pyproject.toml kftune components pipelines)"
mlflow_key="$(key_of infra/mlflow.Dockerfile infra/mlflow.lock)"
built_key() { docker image inspect -f '{{index .Config.Labels "kftune.build-key"}}' "$1" 2>/dev/null || true; }

todo=()
[[ "$(built_key "$IMAGE")" == "$image_key" ]] && echo "$IMAGE is up to date ($image_key)" || todo+=(component)
[[ "$(built_key "$MLFLOW_IMAGE")" == "$mlflow_key" ]] && echo "$MLFLOW_IMAGE is up to date ($mlflow_key)" \
  || todo+=(mlflow)
[[ ${#todo[@]} -eq 0 ]] && exit 0

# the wheelhouse: exactly the files the locks name, checked against their sha256 as pip fetches them
# (one folder for every lock: pip keeps a file already there when its hash matches)
lock_sum="$(git show HEAD:requirements.lock HEAD:infra/mlflow.lock | sha256sum | cut -c1-16)"
wheels=".kftune/wheelhouse"
# pip tags (not this host's) so that a laptop on another OS fetches the same Linux files the locks name
platforms=()
for minor in $(seq 36 -1 5); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64
            --platform linux_x86_64)
if [[ "$(cat "$wheels/.complete" 2>/dev/null)" != "$lock_sum" ]]; then
  mkdir -p "$wheels"
  for lock in requirements.lock infra/mlflow.lock; do
    git show "HEAD:$lock" > "$wheels/.lock"
    "$PYTHON" -m pip download --quiet --no-deps --require-hashes -r "$wheels/.lock" -d "$wheels" \
      "${platforms[@]}" --python-version 3.11 --implementation cp --abi cp311 \
      2> >(grep -v "is ignored: it is neither" >&2)
  done
  rm "$wheels/.lock"
  echo "$lock_sum" > "$wheels/.complete"
fi
ctx="$(mktemp -d "${TMPDIR:-/tmp}/kftune-image.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
git archive HEAD | tar -x -C "$ctx"
cp -al "$wheels" "$ctx/wheels" 2>/dev/null || cp -a "$wheels" "$ctx/wheels"
build() {  # name dockerfile key tag args...
  local name="$1" file="$2" key="$3" tag="$4"; shift 4
  local start=$SECONDS
  docker build --network host -f "$ctx/$file" --build-arg BASE="$BASE" --label kftune.build-key="$key" \
    --label org.opencontainers.image.revision="$commit" -t "$tag" "$@" "$ctx" >"$ctx/$name.log" 2>&1 \
    || { tail -30 "$ctx/$name.log" >&2; echo "docker build of $tag ($file) failed" >&2; exit 1; }
  echo "$tag built in $((SECONDS - start)) s: $(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec)"
}
# the installed dependencies get a tag of their own (the hash of the Dockerfile and the lock), so that the
# layer cache survives `docker image prune` and a code change rebuilds only the small layers above them
deps_tag() { echo "kftune-cache:$1-$(key_of "$2" "$3")"; }
for t in "${todo[@]}"; do
  case "$t" in
    component)
      build component-deps infra/Dockerfile "$image_key" "$(deps_tag deps infra/Dockerfile requirements.lock)" \
        --build-arg TORCH="$TORCH" --target deps
      build component infra/Dockerfile "$image_key" "$IMAGE" --build-arg GIT_COMMIT="$commit" \
        --build-arg TORCH="$TORCH" ;;
    mlflow)
      build mlflow-deps infra/mlflow.Dockerfile "$mlflow_key" \
        "$(deps_tag mlflow-deps infra/mlflow.Dockerfile infra/mlflow.lock)" --target deps
      build mlflow infra/mlflow.Dockerfile "$mlflow_key" "$MLFLOW_IMAGE" ;;
  esac
done
