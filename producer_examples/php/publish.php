<?php
// Publish one mail job from PHP with php-amqplib (Debian: apt-get install php-cli php-amqplib;
// or composer require php-amqplib/php-amqplib): publisher confirms, a persistent message,
// the job id as message_id, and the x-delay header to send it later.
//
//   php publish.php someone@example.org "Subject" "Text" [delayMs]
//
// Reads MAILBUS_AMQP_URL and MAILBUS_PREFIX; prints the job id once RabbitMQ confirmed it.

$autoload = __DIR__ . '/vendor/autoload.php';
require file_exists($autoload) ? $autoload : 'PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;
use PhpAmqpLib\Wire\AMQPTable;

$to = $argv[1] ?? null;
if ($to === null) {
    fwrite(STDERR, "usage: php publish.php TO [SUBJECT] [TEXT] [DELAY_MS]\n");
    exit(2);
}
$url = parse_url(getenv('MAILBUS_AMQP_URL') ?: 'amqp://guest:guest@127.0.0.1:5672/');
$vhost = isset($url['path']) && strlen($url['path']) > 1 ? rawurldecode(substr($url['path'], 1)) : '/';
$prefix = getenv('MAILBUS_PREFIX') ?: 'mailbus';

$job = [
    'id' => bin2hex(random_bytes(16)),
    'domain' => 'example.com',
    'from' => ['email' => 'app@example.com', 'name' => 'PHP app'],
    'to' => [$to],
    'subject' => $argv[2] ?? 'Hello from PHP',
    'text' => $argv[3] ?? 'Sent by producer_examples/php/publish.php',
];

$connection = new AMQPStreamConnection(
    $url['host'], $url['port'] ?? 5672,
    rawurldecode($url['user'] ?? 'guest'), rawurldecode($url['pass'] ?? 'guest'), $vhost
);
$channel = $connection->channel();
$channel->confirm_select();
$refused = false;
$channel->set_nack_handler(function () use (&$refused) { $refused = true; });
$channel->set_return_listener(function () use (&$refused) { $refused = true; });

$properties = [
    'content_type' => 'application/json',
    'delivery_mode' => AMQPMessage::DELIVERY_MODE_PERSISTENT,
    'message_id' => $job['id'], // publishing the same id twice sends one mail
];
if (isset($argv[4])) {
    $properties['application_headers'] = new AMQPTable(['x-delay' => (int) $argv[4]]);
}
$message = new AMQPMessage(json_encode($job, JSON_UNESCAPED_UNICODE), $properties);
$channel->basic_publish($message, $prefix, 'send', true);
$channel->wait_for_pending_acks_returns(10);
$channel->close();
$connection->close();

if ($refused) {
    fwrite(STDERR, "RabbitMQ did not take the job\n");
    exit(1);
}
echo $job['id'], "\n";
