package natsserver

// LinksUnsupported is linksUnsupported, for the external tests.
var LinksUnsupported = linksUnsupported
