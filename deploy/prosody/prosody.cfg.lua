-- Minimal Prosody for xtls-component (see the README, "Declare the component").
admins = { }
modules_enabled = { "roster"; "saslauth"; "tls"; "disco"; "ping"; "register" }
allow_registration = false
c2s_require_encryption = true
log = { info = "*console" }
pidfile = "/var/run/prosody/prosody.pid"

-- The component listener must be reachable from the xtls-component container.
component_ports = { 5347 }
component_interfaces = { "*" }

VirtualHost "example.org"

Component "bots.example.org"
    component_secret = "change-me-component-secret"
