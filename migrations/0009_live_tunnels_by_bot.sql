-- The live tunnel rows of one bot: an instance that takes a bot over closes those another
-- instance left open, one bot at a time, among every live tunnel of the domain.

CREATE INDEX tunnels_live_by_bot ON tunnels (bot_jid) WHERE state != 'closed';
