# Everything a newcomer needs: `make invoke` runs the function locally on a sample event,
# `make test` runs every test. Both install what they need themselves.
SHELL := /bin/bash
VENV := .venv
EVENT ?= events/mixed.json
PIP_PACKAGES := cargo-lambda==1.9.2 moto[server]==5.* cfn-lint==1.*

# The deployable's architecture: the template's default (arm64), or ARCH=x86_64.
ARCH ?= arm64
HOST_ARCH := $(shell uname -m | sed 's/aarch64/arm64/')
RUST_TARGET_arm64 := aarch64-unknown-linux-gnu
RUST_TARGET_x86_64 := x86_64-unknown-linux-gnu
SAM := SAM_CLI_TELEMETRY=0 $(VENV)/bin/sam

.PHONY: build dev up test e2e lint validate deploy emulator invoke bench footprint venv clean

$(VENV)/.installed: Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(PIP_PACKAGES)
	touch $@

## venv: the project-local Python tools (cargo-lambda, moto)
venv: $(VENV)/.installed

## build: the deployable bootstrap, as SAM builds it (ARCH=arm64, the default, or x86_64)
build: venv
	@case "$(ARCH)" in arm64|x86_64) ;; *) echo "build: ARCH must be arm64 or x86_64, not $(ARCH)" >&2; exit 2;; esac
	@rustup target list --installed 2>/dev/null | grep -qx "$(RUST_TARGET_$(ARCH))" || { \
	  echo "build: the Rust target for $(ARCH) is not installed; run: rustup target add $(RUST_TARGET_$(ARCH))" >&2; exit 2; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cargo lambda build --release --bin bootstrap \
	  --target $(RUST_TARGET_$(ARCH))
	@ls -l target/lambda/bootstrap/bootstrap

## dev: compile every binary of the workspace for this machine (debug)
dev:
	cargo build --workspace --bins

## test: every unit and integration test
test: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cargo test --workspace

## up: a local stack (moto SQS, the emulator, INSTANCES bootstrap processes per queue) until Ctrl-C
up: venv
	cargo build --quiet --bin bootstrap
	INSTANCES="$(INSTANCES)" BATCH_SIZE="$(BATCH_SIZE)" BATCHING_WINDOW_SECONDS="$(BATCHING_WINDOW_SECONDS)" \
	  EMULATOR_ARGS="$(EMULATOR_ARGS)" cargo run --quiet -p mpvod-bench --bin local-stack

## e2e: end-to-end scenarios: moto's SQS, the event source mapping, bootstrap processes, the emulator
e2e: venv
	cargo build --quiet --bin bootstrap
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cargo test -p mpvod-bench --test e2e -- --nocapture

## lint: formatting, clippy with warnings as errors, and the SAM template
lint: venv
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	AWS_DEFAULT_REGION=us-east-1 $(VENV)/bin/cfn-lint template.yaml

$(VENV)/.sam-installed: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "aws-sam-cli==1.*"
	touch $@

## validate: cfn-lint and sam validate --lint on the template, for both architectures (offline)
validate: $(VENV)/.sam-installed
	@for arch in arm64 x86_64; do \
	  sed 's/^    Default: arm64$$/    Default: '"$$arch"'/' template.yaml > .validate-$$arch.yaml; \
	  grep -q "Default: $$arch" .validate-$$arch.yaml || { echo "validate: no Architecture default to set" >&2; exit 1; }; \
	  echo "==> $$arch"; \
	  AWS_DEFAULT_REGION=us-east-1 $(VENV)/bin/cfn-lint .validate-$$arch.yaml || exit 1; \
	  AWS_DEFAULT_REGION=us-east-1 $(SAM) validate --lint --template .validate-$$arch.yaml || exit 1; \
	  rm -f .validate-$$arch.yaml; \
	done

## deploy: sam build (for ARCH) and sam deploy with samconfig.toml (add GUIDED=1 the first time)
deploy: $(VENV)/.sam-installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SAM) build --parameter-overrides Architecture=$(ARCH)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SAM) deploy $(if $(GUIDED),--guided)

## emulator: serve the MediaPackage VOD emulator in the foreground (ARGS="--rate 10")
emulator:
	cargo run --quiet -p mpvod-emulator -- --packaging-group vod-group $(ARGS)

## bench: drain a throttled backlog with this function and the baselines, side by side
bench:
	cargo run --release --quiet -p mpvod-bench --bin drain-bench

## footprint: binary size, cold init, peak RSS and batch latency beside a minimal function
footprint:
	cargo build --release --quiet -p mediapackage-vod-ingest --bin bootstrap
	cargo build --release --quiet -p mpvod-bench --bin minimal
	cargo run --release --quiet -p mpvod-bench --bin footprint

## invoke: run the function under cargo lambda watch on EVENT against the emulator
invoke: venv
	scripts/invoke.sh $(EVENT)

clean:
	cargo clean
	rm -rf $(VENV)
