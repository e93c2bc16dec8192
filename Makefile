# agent-workspaces: build, install, test.
#
#   make                 release build
#   make install DESTDIR=... prefix=/usr
#   make up              bring the service up for real and show it answering busctl
#                        (on a systemd host: installs it; elsewhere: in a disposable test host)
#   make down            stop the test host that `make up` started
#   make test            the whole test suite: unit and contract tests, then the system tests
#                        against real systemd, machined, polkit and journald in a test host
#   make lint            rustfmt and clippy, warnings are errors
#   make bench           exec latency through D-Bus against baselines, in the test host
#   make deb             a Debian package, target/agent-workspaces_VERSION_ARCH.deb

prefix ?= /usr
bindir ?= $(prefix)/bin
libexecdir ?= $(prefix)/libexec
datadir ?= $(prefix)/share
mandir ?= $(datadir)/man
sysconfdir ?= /etc
systemdsystemunitdir ?= $(prefix)/lib/systemd/system
CARGO ?= cargo
TESTHOST := tests/testhost/testhost.sh
# The agent runs inside every container, on the container's own libc: it is linked statically.
HOST_TRIPLE := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
AGENT := target/$(HOST_TRIPLE)/release/agent-workspaces-agent
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null)
DEB := target/agent-workspaces_$(VERSION)_$(DEB_ARCH).deb

.PHONY: all build docs install uninstall deb up down test unit-test system-test e2e-test package-test lint bench

all: build

build: docs
	$(CARGO) build --release --locked
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked \
		-p agent-workspaces-agent --target $(HOST_TRIPLE)

# Manual pages and workspacectl's shell completions, rendered from the command lines (src/cli.rs).
docs:
	rm -rf target/docs
	$(CARGO) run --release --locked --quiet --example docs -- target/docs
	gzip -9n target/docs/man/*

install: build
	install -Dm755 target/release/agent-workspaced $(DESTDIR)$(libexecdir)/agent-workspaced
	install -Dm755 target/release/agent-workspaces-http $(DESTDIR)$(libexecdir)/agent-workspaces-http
	install -Dm755 target/release/workspacectl $(DESTDIR)$(bindir)/workspacectl
	install -Dm755 target/release/agent-workspaces-mcp $(DESTDIR)$(bindir)/agent-workspaces-mcp
	install -Dm755 $(AGENT) $(DESTDIR)$(libexecdir)/agent-workspaces-agent
	install -d $(DESTDIR)$(mandir)/man1 $(DESTDIR)$(mandir)/man8 $(DESTDIR)$(sysconfdir)/agent-workspaces
	install -m644 target/docs/man/*.1.gz $(DESTDIR)$(mandir)/man1/
	install -m644 target/docs/man/*.8.gz $(DESTDIR)$(mandir)/man8/
	install -Dm644 target/docs/completions/workspacectl.bash $(DESTDIR)$(datadir)/bash-completion/completions/workspacectl
	install -Dm644 target/docs/completions/_workspacectl $(DESTDIR)$(datadir)/zsh/vendor-completions/_workspacectl
	install -Dm644 target/docs/completions/workspacectl.fish $(DESTDIR)$(datadir)/fish/vendor_completions.d/workspacectl.fish
	install -Dm644 sysusers/agent-workspaces-http.conf $(DESTDIR)$(prefix)/lib/sysusers.d/agent-workspaces-http.conf
	install -Dm644 polkit/50-agent-workspaces-http.rules $(DESTDIR)$(datadir)/polkit-1/rules.d/50-agent-workspaces-http.rules
	install -Dm644 dbus/org.agent.Workspaces.conf $(DESTDIR)$(datadir)/dbus-1/system.d/org.agent.Workspaces.conf
	install -Dm644 dbus/org.agent.Workspaces.service $(DESTDIR)$(datadir)/dbus-1/system-services/org.agent.Workspaces.service
	install -Dm644 dbus/org.agent.Workspaces.xml $(DESTDIR)$(datadir)/dbus-1/interfaces/org.agent.Workspaces.xml
	install -Dm644 polkit/org.agent.workspaces.policy $(DESTDIR)$(datadir)/polkit-1/actions/org.agent.workspaces.policy
	install -d $(DESTDIR)$(systemdsystemunitdir)
	for unit in agent-workspaced.service agent-workspaces-http.service agent-workspaces-http.socket; do \
		sed 's|/usr/libexec/|$(libexecdir)/|' systemd/$$unit > $(DESTDIR)$(systemdsystemunitdir)/$$unit && \
		chmod 644 $(DESTDIR)$(systemdsystemunitdir)/$$unit || exit 1; \
	done

uninstall:
	rm -f $(DESTDIR)$(libexecdir)/agent-workspaced $(DESTDIR)$(libexecdir)/agent-workspaces-http \
		$(DESTDIR)$(libexecdir)/agent-workspaces-agent \
		$(DESTDIR)$(bindir)/workspacectl $(DESTDIR)$(bindir)/agent-workspaces-mcp \
		$(DESTDIR)$(mandir)/man1/agent-workspaces-mcp.1.gz \
		$(DESTDIR)$(prefix)/lib/sysusers.d/agent-workspaces-http.conf \
		$(DESTDIR)$(datadir)/polkit-1/rules.d/50-agent-workspaces-http.rules \
		$(DESTDIR)$(systemdsystemunitdir)/agent-workspaces-http.service \
		$(DESTDIR)$(systemdsystemunitdir)/agent-workspaces-http.socket \
		$(DESTDIR)$(datadir)/dbus-1/system.d/org.agent.Workspaces.conf \
		$(DESTDIR)$(datadir)/dbus-1/system-services/org.agent.Workspaces.service \
		$(DESTDIR)$(datadir)/dbus-1/interfaces/org.agent.Workspaces.xml \
		$(DESTDIR)$(datadir)/polkit-1/actions/org.agent.workspaces.policy \
		$(DESTDIR)$(systemdsystemunitdir)/agent-workspaced.service \
		$(DESTDIR)$(mandir)/man1/workspacectl*.1.gz $(DESTDIR)$(mandir)/man8/agent-workspace*.8.gz \
		$(DESTDIR)$(datadir)/bash-completion/completions/workspacectl \
		$(DESTDIR)$(datadir)/zsh/vendor-completions/_workspacectl \
		$(DESTDIR)$(datadir)/fish/vendor_completions.d/workspacectl.fish

# The package is `make install` staged, plus the maintainer scripts of debian/, built with
# Debian's own dpkg-deb: the installed files are listed once, in `install` above.
deb: build
	rm -rf target/deb-root
	$(MAKE) --no-print-directory install DESTDIR=$(CURDIR)/target/deb-root prefix=/usr
	install -Dm644 debian/copyright target/deb-root/usr/share/doc/agent-workspaces/copyright
	install -d target/deb-root/DEBIAN
	install -m755 debian/postinst debian/prerm debian/postrm target/deb-root/DEBIAN/
	sed -e 's/@VERSION@/$(VERSION)/' -e 's/@ARCH@/$(DEB_ARCH)/' \
		-e "s/@SIZE@/$$(du -sk target/deb-root/usr target/deb-root/etc | awk '{s += $$1} END {print s}')/" \
		debian/control.in >target/deb-root/DEBIAN/control
	cd target/deb-root && find usr etc -type f -printf '%p\0' | sort -z | xargs -0 md5sum >DEBIAN/md5sums
	dpkg-deb --root-owner-group --build target/deb-root $(DEB)

up:
	tests/up.sh

down:
	$(TESTHOST) down

test: unit-test system-test e2e-test package-test

unit-test:
	$(CARGO) test --locked --workspace

system-test:
	tests/system/run.sh

e2e-test:
	tests/e2e/run.sh

package-test: deb
	tests/package/run.sh $(DEB)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(CARGO) clippy --locked --test system -- -D warnings  # not in --all-targets (test = false)

bench:
	tests/bench.sh
