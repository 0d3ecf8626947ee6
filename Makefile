# Shortcuts; the scripts are what the README and CI call.
.PHONY: setup test demo bench
setup:
	bash scripts/setup_env.sh
test:
	bash scripts/test.sh
demo:
	bash scripts/demo.sh
