-- Strict `call` (tests): every key a command names must be declared in KEYS.
local DECLARED = {}
for _, k in ipairs(KEYS) do DECLARED[k] = true end
-- Commands whose every argument is a key; every other command used names one key first.
local ALL_KEYS = {DEL = true, EXISTS = true, UNLINK = true}
local function call(cmd, ...)
  local args = {...}
  local last = ALL_KEYS[string.upper(cmd)] and #args or 1
  for i = 1, last do
    if not DECLARED[args[i]] then
      error('upgate strict keys: ' .. cmd .. ' on undeclared key ' .. tostring(args[i]))
    end
  end
  return redis.call(cmd, ...)
end
