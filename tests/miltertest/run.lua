-- Entry point used by tests/test_protocol.py: miltertest exits 1 on a Lua error but prints
-- nothing, so run the case under pcall and echo the message first.
-- -D dir=<this directory> -D script=<case file name>
local okay, err = pcall(dofile, dir .. "/" .. script)
if not okay then
  mt.echo("FAIL " .. script .. ": " .. tostring(err))
  error(err)
end
mt.echo("PASS " .. script)
