-- Release a lease only if it is still ours: a caller whose lease expired must not delete the
-- lease another caller has taken since. KEYS[1]: the lease; ARGV[1]: our owner token.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
