# edd: run it locally, test it, install it.
#
#   make run         a local edd on 127.0.0.1:8866 (config.example.json, dev PKI)
#   make certs       the dev PKI in ./pki/ (CA, server and client certificates)
#   make test        the test suite (pytest: into .venv when missing; engines)
#   make install     program, systemd unit and /etc/edd/config.json (if absent)
#   make uninstall   remove program and unit; /etc/edd is left alone
#   make bench       the benchmark (issue 5); BENCH_ARGS=--full adds 1 GiB,
#                    BENCH_ARGS=--thin measures edd push (issue 12)
#   make client-cert NAME=alice [DNS=..|EMAIL=..]   a client certificate (90 days)
#
# install and uninstall honour DESTDIR and PREFIX, e.g.
#   make install DESTDIR=/tmp/pkgroot PREFIX=/usr

PYTHON  ?= python3
PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR  ?= $(PREFIX)/bin
UNITDIR ?= /lib/systemd/system
CONFDIR ?= /etc/edd
PKI     ?= pki
VENV    ?= .venv
TESTS   ?= tests

# Dev certificates: EC P-256 keys, which openssl makes instantly.
NEWKEY   = openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256
CERTDAYS = 825

.PHONY: help run certs client-cert test bench install uninstall clean

help:
	@sed -n '3,11s/^# *//p' Makefile

run: certs
	$(PYTHON) edd.py --config config.example.json

# The tests need pytest and nothing else from outside the standard library.
# When $(PYTHON) has no pytest, it goes into a virtual environment in $(VENV)
# (Debian/Ubuntu: the python3-venv package). EDD_TEST_ENGINES picks the
# engines (default docker,podman); EDD_REQUIRE_DOCKER=1 fails when one is
# missing instead of skipping its tests. TESTS=tests/test_units.py runs one file.
# tests/run_engines.py runs one pytest session per engine, side by side.
test:
	@if $(PYTHON) -m pytest --version >/dev/null 2>&1; then py='$(PYTHON)'; \
	else $(MAKE) --no-print-directory $(VENV)/bin/pytest && py='$(VENV)/bin/python'; fi; \
	echo "$$py tests/run_engines.py $(TESTS)"; $$py tests/run_engines.py $(TESTS)

$(VENV)/bin/pytest:
	$(PYTHON) -m venv $(VENV) || { echo "make test: cannot make a venv;" \
	    "on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
	$(VENV)/bin/python -m pip install -q pytest

# edd against `docker load` locally and over ssh; bench/bench.py says what it
# measures. Needs root, a Docker engine, curl, openssl, openssh-server and
# busybox-static. About 3 minutes; BENCH_ARGS=--full adds a 1 GiB image.
BENCH_ARGS ?=

# --thin shapes lo with tc; the trap removes that qdisc (handle edd:) even if
# the bench itself is killed before its own clean-up runs.
bench:
	trap 'tc qdisc del dev lo root handle edd: 2>/dev/null || true' EXIT INT TERM HUP; \
	$(PYTHON) bench/bench.py $(BENCH_ARGS)

# ---------------------------------------------------------------- dev PKI
# File targets, so `make certs` only creates what is missing. Each leaf
# certificate is signed from a CSR with an extension file, which works with
# OpenSSL 1.1.1 as well as 3.x. The key identifiers matter: Python 3.13
# verifies with VERIFY_X509_STRICT, which rejects certificates without them.

certs: $(PKI)/ca.crt $(PKI)/server.crt $(PKI)/client.crt

$(PKI)/ca.key $(PKI)/server.key $(PKI)/client.key:
	@mkdir -p $(PKI)
	umask 077 && $(NEWKEY) -out $@

$(PKI)/ca.crt: $(PKI)/ca.key
	printf '%s\n' '[req]' 'distinguished_name = dn' '[dn]' '[ca]' \
	    'basicConstraints = critical, CA:TRUE' \
	    'keyUsage = critical, keyCertSign, cRLSign' \
	    'subjectKeyIdentifier = hash' > $@.cnf
	openssl req -x509 -new -sha256 -days $(CERTDAYS) -key $< \
	    -subj '/CN=edd dev CA' -config $@.cnf -extensions ca -out $@
	rm -f $@.cnf

$(PKI)/server.crt: $(PKI)/server.key $(PKI)/ca.crt
	printf '%s\n' 'basicConstraints = CA:FALSE' \
	    'keyUsage = critical, digitalSignature' \
	    'extendedKeyUsage = serverAuth' \
	    'subjectAltName = DNS:localhost, IP:127.0.0.1' \
	    'subjectKeyIdentifier = hash' \
	    'authorityKeyIdentifier = keyid' > $@.ext
	openssl req -new -key $< -subj '/CN=localhost' -out $@.csr
	openssl x509 -req -sha256 -days $(CERTDAYS) -in $@.csr \
	    -CA $(PKI)/ca.crt -CAkey $(PKI)/ca.key -set_serial 0x$$(openssl rand -hex 16) \
	    -extfile $@.ext -out $@
	rm -f $@.csr $@.ext

$(PKI)/client.crt: $(PKI)/client.key $(PKI)/ca.crt
	printf '%s\n' 'basicConstraints = CA:FALSE' \
	    'keyUsage = critical, digitalSignature' \
	    'extendedKeyUsage = clientAuth' \
	    'subjectKeyIdentifier = hash' \
	    'authorityKeyIdentifier = keyid' > $@.ext
	openssl req -new -key $< -subj '/CN=dev-client' -out $@.csr
	openssl x509 -req -sha256 -days $(CERTDAYS) -in $@.csr \
	    -CA $(PKI)/ca.crt -CAkey $(PKI)/ca.key -set_serial 0x$$(openssl rand -hex 16) \
	    -extfile $@.ext -out $@
	rm -f $@.csr $@.ext

# ---------------------------------------------------------------- client certificates
# make client-cert NAME=alice                  identity "alice" (the subject CN)
# make client-cert NAME=ci DNS=ci.example      identity "dns:ci.example"
# make client-cert NAME=dana EMAIL=dana@example.com   identity "email:dana@example.com"
# Writes OUT/NAME.key (mode 600) and OUT/NAME.crt, signed with CA_CERT and
# CA_KEY: point them at wherever the CA key lives (it never needs to be on
# the edd host). DAYS defaults to 90: edd has no revocation list, so a short
# lifetime is what ends a lost key's use. Prints the identity for `clients`.
CA_CERT ?= $(PKI)/ca.crt
CA_KEY  ?= $(PKI)/ca.key
OUT     ?= $(PKI)
DAYS    ?= 90
comma   := ,
SAN      = $(if $(DNS),DNS:$(DNS))$(if $(DNS),$(if $(EMAIL),$(comma)))$(if $(EMAIL),email:$(EMAIL))
IDENTITY = $(if $(DNS),dns:$(DNS),$(if $(EMAIL),email:$(EMAIL),$(NAME)))

client-cert:
	@test -n "$(NAME)" || { echo "make client-cert: give NAME=, e.g. make client-cert NAME=alice" >&2; exit 2; }
	@test ! -e "$(OUT)/$(NAME).crt" || { echo "make client-cert: $(OUT)/$(NAME).crt exists; remove it first" >&2; exit 2; }
	@mkdir -p "$(OUT)"
	umask 077 && $(NEWKEY) -out "$(OUT)/$(NAME).key"
	printf '%s\n' 'basicConstraints = CA:FALSE' \
	    'keyUsage = critical, digitalSignature' \
	    'extendedKeyUsage = clientAuth' \
	    'subjectKeyIdentifier = hash' \
	    'authorityKeyIdentifier = keyid' \
	    $(if $(SAN),'subjectAltName = $(SAN)') > "$(OUT)/$(NAME).ext"
	openssl req -new -key "$(OUT)/$(NAME).key" -subj '/CN=$(NAME)' -out "$(OUT)/$(NAME).csr"
	openssl x509 -req -sha256 -days $(DAYS) -in "$(OUT)/$(NAME).csr" \
	    -CA "$(CA_CERT)" -CAkey "$(CA_KEY)" -set_serial 0x$$(openssl rand -hex 16) \
	    -extfile "$(OUT)/$(NAME).ext" -out "$(OUT)/$(NAME).crt"
	@rm -f "$(OUT)/$(NAME).csr" "$(OUT)/$(NAME).ext"
	@echo "$(OUT)/$(NAME).crt: valid $(DAYS) days; add this to a deployment's clients (or admins):"
	@echo "identity: $(IDENTITY)"

# ---------------------------------------------------------------- install
# The unit in the repo names /usr/local/bin/edd and /etc/edd; install writes
# the real BINDIR and CONFDIR into the copy it installs. The installed
# config.json is config.example.json with the production values: listen on
# all addresses, certificates in CONFDIR (operators put theirs there). An
# existing config.json is never touched.

install:
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR)
	install -m 755 edd.py $(DESTDIR)$(BINDIR)/edd
	sed -e 's|/usr/local/bin/edd|$(BINDIR)/edd|g' -e 's|/etc/edd/|$(CONFDIR)/|g' \
	    edd.service > $(DESTDIR)$(UNITDIR)/edd.service
	chmod 644 $(DESTDIR)$(UNITDIR)/edd.service
	[ -d $(DESTDIR)$(CONFDIR) ] || install -d -m 750 $(DESTDIR)$(CONFDIR)
	@if [ -e $(DESTDIR)$(CONFDIR)/config.json ]; then \
	    echo "keeping existing $(DESTDIR)$(CONFDIR)/config.json"; \
	else \
	    echo "installing $(DESTDIR)$(CONFDIR)/config.json"; \
	    umask 077 && sed -e 's|"127\.0\.0\.1:8866"|"0.0.0.0:8866"|' \
	        -e 's|"pki/|"$(CONFDIR)/|g' -e 's|"state_dir": "state"|"state_dir": "/var/lib/edd"|' \
	        config.example.json \
	        > $(DESTDIR)$(CONFDIR)/config.json && \
	    chmod 640 $(DESTDIR)$(CONFDIR)/config.json; \
	fi

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/edd $(DESTDIR)$(UNITDIR)/edd.service
	@echo "left $(DESTDIR)$(CONFDIR) in place (config and keys)"

clean:
	rm -rf $(PKI) $(VENV) .pytest_cache tests/__pycache__
