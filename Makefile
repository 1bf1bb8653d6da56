# Everything a newcomer needs: `make invoke` runs the function locally on a sample event,
# `make test` runs every test. Both install what they need themselves.
SHELL := /bin/bash
VENV := .venv
EVENT ?= events/mixed.json
PIP_PACKAGES := cargo-lambda==1.9.2 moto[server]==5.* cfn-lint==1.*

.PHONY: build test lint emulator invoke bench footprint venv clean

$(VENV)/.installed: Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(PIP_PACKAGES)
	touch $@

## venv: the project-local Python tools (cargo-lambda, moto)
venv: $(VENV)/.installed

## build: compile the function (bootstrap) and the emulator
build:
	cargo build --workspace --bins

## test: every unit and integration test
test: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cargo test --workspace

## lint: formatting, clippy with warnings as errors, and the SAM template
lint: venv
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	AWS_DEFAULT_REGION=us-east-1 $(VENV)/bin/cfn-lint template.yaml

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
